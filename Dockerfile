# One image for every churn-stream Python service and the dashboard; docker-compose.yml picks
# the command. CPU-only builds of the heavy libraries come from requirements.txt
# (tensorflow-cpu, xgboost-cpu), so no CUDA libraries are pulled in.
FROM python:3.11-slim-bookworm

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

# Microsoft's ODBC Driver 18 for SQL Server (MSSQL_DRIVER's default) from its Debian 12
# repository, with unixODBC. Without Microsoft's repository, Debian's FreeTDS works too:
# install `tdsodbc unixodbc` instead and set MSSQL_DRIVER=FreeTDS.
# Debian package versions are left to the distribution's security updates, hence DL3008.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl gnupg \
    && curl -fsSL https://packages.microsoft.com/keys/microsoft.asc \
       | gpg --dearmor -o /usr/share/keyrings/microsoft-prod.gpg \
    && echo "deb [arch=amd64,arm64 signed-by=/usr/share/keyrings/microsoft-prod.gpg]" \
            "https://packages.microsoft.com/debian/12/prod bookworm main" \
       > /etc/apt/sources.list.d/mssql-release.list \
    && apt-get update \
    && ACCEPT_EULA=Y apt-get install -y --no-install-recommends msodbcsql18 unixodbc \
    && apt-get purge -y --auto-remove curl gnupg \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY churn_stream/ churn_stream/
COPY dashboard/ dashboard/
COPY docker/ docker/
COPY *.py pyproject.toml ./

# Services run as an unprivileged user; data/ is the only place they may write (SQLite).
RUN groupadd --gid 10001 churn \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin churn \
    && mkdir -p /app/data \
    && chown 10001:10001 /app/data
USER 10001:10001

EXPOSE 8000 8001 8501 9101 9103 9104
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "docker/healthcheck.py"]
CMD ["python", "consumer.py"]
