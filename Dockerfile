# The exchange daemon. Built by docker-compose.yml; runs as an unprivileged user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN useradd --system --uid 10001 --home-dir /app exchange
# The dependencies first, in their own layer: it is rebuilt only when pyproject.toml changes, not on
# every change to the code. (tomllib reads [project] dependencies; the build backend is installed here
# too, so the package's own install below needs no download.)
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); \
print('\n'.join(p['project']['dependencies'] + p['build-system']['requires']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
# Then the code, installed without its dependencies (already there).
COPY README.md LICENSE ./
COPY exchange ./exchange
COPY recovery ./recovery
RUN pip install --no-deps --no-build-isolation .
COPY config ./config
USER exchange
# /metrics, /healthz, /readyz, /status (config/compose.toml binds them to 0.0.0.0 inside the container)
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"
ENTRYPOINT ["exchange"]
CMD ["run", "--config", "config/compose.toml"]
