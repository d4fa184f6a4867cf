# Publish API image: `docker build -f docker/api.Dockerfile -t enpipeline-api .` (from the repo root).
# The same image runs the federation server (`enpipeline federation serve ...`) and the one-shot
# `enpipeline db migrate` job; docker/compose.yaml shows all three.
# Secrets (ENP_DATABASE_URL, ENP_REVISION_TOKEN_KEK, ENP_REVISION_TOKEN_AAD) come from the environment
# or the orchestrator's secret store at run time, never from the image.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ENP_ENV=production ENP_VAR_DIR=/var/lib/enpipeline
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY pyproject.toml README.md ./
COPY enpipeline enpipeline
COPY api api
COPY plugins plugins
COPY sql sql
# A fixed uid, so volumes and security policies can name it; the only writable place is ENP_VAR_DIR.
RUN pip install --no-cache-dir --no-deps . \
    && useradd --system --uid 10001 --gid 0 --home-dir /var/lib/enpipeline --no-create-home enp \
    && mkdir -p /var/lib/enpipeline && chown 10001:0 /var/lib/enpipeline && chmod 0770 /var/lib/enpipeline \
    && enpipeline --help >/dev/null
USER 10001:0
EXPOSE 8080 8081
# /health pings the database (cached 1 s); python is all the slim image has to ask it with.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4).status != 200)"]
# Run `enpipeline db migrate` once per release (a job), then serve.
CMD ["enpipeline", "api", "--host", "0.0.0.0", "--port", "8080"]
