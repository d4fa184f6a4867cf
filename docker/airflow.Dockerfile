# Airflow image with enpipeline, its DAGs and hooks:
#   docker build -f docker/airflow.Dockerfile -t enpipeline-airflow .      (from the repo root)
# One image for every Airflow component (api-server, scheduler, dag-processor, triggerer, Celery workers).
# The tag below must equal requirements.txt's apache-airflow pin (tests/unit/test_docker_compose.py checks it).
# Nothing secret is baked in: connections come from AIRFLOW_CONN_* variables or a secrets backend, ENP_*
# secrets and Airflow's fernet/JWT keys from the environment at run time (docker/compose.yaml).
FROM apache/airflow:3.3.2-python3.11

USER airflow
ENV AIRFLOW__CORE__DAGS_FOLDER=/opt/airflow/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/airflow/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ENP_ENV=production \
    ENP_VAR_DIR=/opt/airflow/enp \
    ENP_KEY_DIR=/opt/airflow/enp/keys

# Our exact pins win; Airflow's constraints (shipped in the image) hold every other transitive dependency
# at the versions Airflow 3.3.2 was released and tested with. A constraint naming a package we pin is dropped,
# so the two never disagree. Build with --build-arg AIRFLOW_CONSTRAINTS=none to resolve without them.
ARG AIRFLOW_CONSTRAINTS=image
COPY --chown=airflow:0 requirements.txt /tmp/enp/requirements.txt
RUN if [ "${AIRFLOW_CONSTRAINTS}" = "image" ]; then \
        awk 'function norm(s) { s = tolower(s); gsub(/[-_.]+/, "-", s); sub(/\[.*/, "", s); return s } \
             NR == FNR { if ($0 ~ /^[A-Za-z0-9]/) { split($0, p, "=="); pinned[norm(p[1])] = 1 } next } \
             { split($0, p, "=="); if (!(norm(p[1]) in pinned)) print }' \
            /tmp/enp/requirements.txt "${HOME}/constraints.txt" > /tmp/enp/constraints.txt; \
    else : > /tmp/enp/constraints.txt; fi \
    && pip install --no-cache-dir -r /tmp/enp/requirements.txt -c /tmp/enp/constraints.txt

# The enpipeline package itself (domain, API code, hooks, migrations); its dependencies are installed above.
COPY --chown=airflow:0 pyproject.toml README.md /tmp/enp/src/
COPY --chown=airflow:0 enpipeline /tmp/enp/src/enpipeline
COPY --chown=airflow:0 api /tmp/enp/src/api
COPY --chown=airflow:0 plugins /tmp/enp/src/plugins
COPY --chown=airflow:0 sql /tmp/enp/src/sql
RUN pip install --no-cache-dir --no-deps /tmp/enp/src \
    && rm -rf /tmp/enp \
    && mkdir -p /opt/airflow/enp/keys \
    && chmod -R g+rwX,o-rwx /opt/airflow/enp \
    && enpipeline --help >/dev/null

# DAGs and hooks baked in, so every component runs the same code (no shared DAG volume to keep in sync).
COPY --chown=airflow:0 dags /opt/airflow/dags
COPY --chown=airflow:0 plugins /opt/airflow/plugins
RUN python -c "import plugins.enp_hooks, enpipeline.cli"
