"""enpipeline: an Exposure Notification key server built as an Airflow data pipeline."""

__version__ = "0.1.0"
