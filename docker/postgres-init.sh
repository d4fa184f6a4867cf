#!/usr/bin/env bash
# First start of the postgres container only (an empty data volume): one database and one owner role each for
# enpipeline (`enp`) and Airflow's metadata (`airflow`). Passwords come from the container's environment
# (docker/compose.yaml passes ENPIPELINE_DB_PASSWORD and AIRFLOW_DB_PASSWORD from docker/.env); none is stored
# here.
set -euo pipefail
: "${ENPIPELINE_DB_PASSWORD:?ENPIPELINE_DB_PASSWORD is not set}" "${AIRFLOW_DB_PASSWORD:?AIRFLOW_DB_PASSWORD is not set}"

psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
     -v enp_password="${ENPIPELINE_DB_PASSWORD}" -v airflow_password="${AIRFLOW_DB_PASSWORD}" <<'SQL'
CREATE ROLE enp LOGIN PASSWORD :'enp_password';
CREATE DATABASE enp OWNER enp;
REVOKE ALL ON DATABASE enp FROM PUBLIC;
CREATE ROLE airflow LOGIN PASSWORD :'airflow_password';
CREATE DATABASE airflow OWNER airflow;
REVOKE ALL ON DATABASE airflow FROM PUBLIC;
SQL
