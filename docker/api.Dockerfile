# Publish API image: `docker build -f docker/api.Dockerfile -t enpipeline-api .`
# Secrets (ENP_DATABASE_URL, ENP_REVISION_TOKEN_KEK, ENP_REVISION_TOKEN_AAD) come from the environment
# or the orchestrator's secret store at run time, never from the image.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 ENP_ENV=production
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY pyproject.toml README.md ./
COPY enpipeline enpipeline
COPY api api
COPY plugins plugins
COPY sql sql
RUN pip install --no-cache-dir --no-deps . && useradd --system enp
USER enp
EXPOSE 8080
# Run `enpipeline db migrate` once per release (a job), then serve.
CMD ["enpipeline", "api", "--host", "0.0.0.0", "--port", "8080"]
