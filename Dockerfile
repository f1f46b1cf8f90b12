# syntax=docker/dockerfile:1
# webhook-server image: one image for every role (`serve`, `web`, `worker`).
#   docker build -t webhook-server .
#   docker run --rm -p 8000:8000 -e PARTICLE_WEBHOOK_SECRET=... -v webhook-data:/data webhook-server
# docker-compose.yml runs it as two services (`web` and `worker`) behind Traefik.

# --- build: a virtualenv with the package and its dependencies, pinned by constraints.txt ---
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Only what the package needs (see .dockerignore): no tests, no .env, no data.
COPY constraints.txt pyproject.toml README.md ./
COPY webhook_server ./webhook_server
# Every dependency's version comes from constraints.txt, the same pins CI tests with.
RUN pip install --no-cache-dir -c constraints.txt . \
    && python -m compileall -q /opt/venv/lib

# --- runtime: slim Python, the virtualenv, an unprivileged user ---
FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="webhook-server" \
      org.opencontainers.image.description="Self-hosted webhook alert receiver" \
      org.opencontainers.image.licenses="MIT"

# Logs are JSON lines on stdout/stderr, unbuffered, so `docker compose logs` shows them at once.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATA_DIR=/data

# A fixed uid/gid (10001), so a bind-mounted data directory can be chowned to match.
RUN groupadd --system --gid 10001 webhook \
    && useradd --system --uid 10001 --gid webhook --home-dir /home/webhook --create-home \
       --shell /usr/sbin/nologin webhook \
    && mkdir -p /data \
    && chown webhook:webhook /data

COPY --from=build /opt/venv /opt/venv

# The working directory holds no .env: configuration comes from the environment (compose env_file).
WORKDIR /home/webhook
USER 10001:10001

# The SQLite store (events, delivery queue, rate-limit counters). A new named volume
# inherits /data's owner (webhook) from the image.
VOLUME ["/data"]
EXPOSE 8000

# Gunicorn (and the worker) stop gracefully on SIGTERM: in-flight requests get up to
# graceful_timeout (20 s, webhook_server/gunicorn_conf.py) to finish, so give the container
# longer than that before SIGKILL (compose: stop_grace_period: 30s; docker stop -t 30).
STOPSIGNAL SIGTERM

# No curl in a slim image: Python's urllib asks /health (an unhealthy store answers 503).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

# Everything on one host: Gunicorn with the app, and the delivery worker.
# docker-compose.yml overrides this per service (`web`, `worker`).
CMD ["webhook-server", "serve", "--host", "0.0.0.0", "--port", "8000"]
