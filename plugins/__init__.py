"""Airflow plugins and hooks that turn Airflow Connections into enpipeline clients (added with the DAGs)."""
