"""Gunicorn settings for `webhook-server web` and `serve` (`gunicorn -c python:webhook_server.gunicorn_conf`)."""

import os
import sys
from typing import Any

from webhook_server.metrics import child_exit as mark_process_dead
from webhook_server.metrics import clear_stale_files
from webhook_server.ports import PortInUse, check_free

bind = os.environ.get("BIND", "127.0.0.1:5000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Threads, not sync workers: long-lived connections (keep-alive from Traefik, streams) would
# otherwise hold a whole worker each.
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
# Without reuse_port one gthread worker took every keep-alive connection in half the runs here.
reuse_port = True
# Gunicorn 27's control socket is shared by every Gunicorn on the machine; we do not use it.
control_socket_disable = True
# Particle gives up after 20 s: a request must finish well inside that, and a stop (SIGTERM)
# lets in-flight requests finish for up to graceful_timeout before workers are killed.
timeout = 30
graceful_timeout = 20
keepalive = 15
# Our own JSON logs record every request; Gunicorn's access log would repeat them.
accesslog = None
logger_class = "webhook_server.logs.GunicornNoAccessLogger"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# Gunicorn's own messages in the same one-JSON-object-per-line form as the app's.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "webhook_server.logs.JsonFormatter"}},
    "filters": {"listening": {"()": "webhook_server.logs.WithoutEmptyListeningLine"}},
    "handlers": {
        "stdout": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "filters": ["listening"],
            "stream": "ext://sys.stdout",
        }
    },
    # The app attaches its own JSON handler to the root logger (webhook_server.logs).
    "root": {"level": loglevel.upper(), "handlers": []},
    "loggers": {
        "gunicorn.error": {"handlers": ["stdout"], "level": loglevel.upper(), "propagate": False},
        "gunicorn.access": {"handlers": [], "propagate": False},
    },
}
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 16384


# Prometheus multiprocess mode (webhook_server.metrics): clear the files an earlier run left,
# and take a dead worker's live gauges out of the sums. Both do nothing without
# PROMETHEUS_MULTIPROC_DIR (plain `gunicorn "webhook_server:create_app()"`).
def on_starting(server: Any) -> None:
    # With reuse_port each worker binds for itself, so Gunicorn never notices a port that is
    # taken: refuse here, before any worker starts (see webhook_server.ports).
    for address in server.cfg.address:
        if isinstance(address, tuple):
            try:
                check_free(str(address[0]), int(address[1]))
            except PortInUse as exc:
                server.log.error("not starting: %s", exc)
                sys.exit(2)
    clear_stale_files()


def when_ready(server: Any) -> None:
    # Gunicorn's own "Listening at:" line is empty under reuse_port (the master binds nothing).
    urls = [f"http://{a[0]}:{a[1]}" if isinstance(a, tuple) else str(a) for a in server.cfg.address]
    server.log.info("Listening at: %s (%s)", ",".join(urls), server.pid)


def child_exit(server: Any, worker: Any) -> None:
    mark_process_dead(getattr(worker, "pid", 0))
