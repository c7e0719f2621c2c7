# The exchange daemon. Built by docker-compose.yml; runs as an unprivileged user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY exchange ./exchange
COPY recovery ./recovery
RUN pip install . && useradd --system --uid 10001 --home-dir /app exchange
COPY config ./config
USER exchange
# /metrics, /healthz, /readyz, /status (config/compose.toml binds them to 0.0.0.0 inside the container)
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"
ENTRYPOINT ["exchange"]
CMD ["run", "--config", "config/compose.toml"]
