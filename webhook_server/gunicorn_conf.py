"""Gunicorn settings for `webhook-server web` and `serve` (`gunicorn -c python:webhook_server.gunicorn_conf`)."""

import gc
import os
import signal
import sys
from typing import Any

# Every module a worker needs, imported (only imported: no app, connection or thread) here in
# the master, so that the forked workers share those pages instead of each loading its own.
import webhook_server.app  # noqa: F401
from webhook_server.live.service import stop_streams
from webhook_server.ops.metrics import child_exit as mark_process_dead
from webhook_server.ops.metrics import clear_stale_files
from webhook_server.ops.ports import PortInUse, check_free
from webhook_server.settings import ConfigError, setting_from_environment

try:
    workers = setting_from_environment("WEB_CONCURRENCY")
    threads = setting_from_environment("GUNICORN_THREADS")
    loglevel = setting_from_environment("LOG_LEVEL").lower()
except ConfigError as exc:
    sys.exit(f"webhook-server: {exc}")

bind = os.environ.get("BIND", "127.0.0.1:5000")
# Threads, not sync workers: long-lived connections (keep-alive from Traefik, streams) would
# otherwise hold a whole worker each.
worker_class = "gthread"
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
logger_class = "webhook_server.ops.gunicorn_logging.GunicornNoAccessLogger"
errorlog = "-"
# Gunicorn's own messages in the same one-JSON-object-per-line form as the app's.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "webhook_server.ops.logs.JsonFormatter"}},
    "filters": {"listening": {"()": "webhook_server.ops.gunicorn_logging.WithoutEmptyListeningLine"}},
    "handlers": {
        "stdout": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "filters": ["listening"],
            "stream": "ext://sys.stdout",
        }
    },
    # The app attaches its own JSON handler to the root logger (webhook_server.ops.logs).
    "root": {"level": loglevel.upper(), "handlers": []},
    "loggers": {
        "gunicorn.error": {"handlers": ["stdout"], "level": loglevel.upper(), "propagate": False},
        "gunicorn.access": {"handlers": [], "propagate": False},
    },
}
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 16384


def on_starting(server: Any) -> None:
    # With reuse_port each worker binds for itself, so Gunicorn never notices a port that is
    # taken: refuse here, before any worker starts (see webhook_server.ops.ports).
    for address in server.cfg.address:
        if isinstance(address, tuple):
            try:
                check_free(str(address[0]), int(address[1]))
            except PortInUse as exc:
                server.log.error("not starting: %s", exc)
                sys.exit(2)
    # Prometheus multiprocess mode (webhook_server.ops.metrics): clear the files an earlier run
    # left. Does nothing without PROMETHEUS_MULTIPROC_DIR (plain `gunicorn "webhook_server:create_app()"`).
    clear_stale_files()


def when_ready(server: Any) -> None:
    # Gunicorn's own "Listening at:" line is empty under reuse_port (the master binds nothing).
    urls = [f"http://{a[0]}:{a[1]}" if isinstance(a, tuple) else str(a) for a in server.cfg.address]
    server.log.info("Listening at: %s (%s)", ",".join(urls), server.pid)


def post_worker_init(worker: Any) -> None:
    # Until here a signal to the worker meets handlers it inherited from the master and is lost
    # (then a stop waits out graceful_timeout); from here on it is handled. Say so.
    worker.log.info("Worker ready (pid: %s)", worker.pid)
    # A stop (SIGTERM, or SIGINT/SIGQUIT for a quick one) also ends this worker's live streams,
    # which would otherwise hold the stop for graceful_timeout; clients resume from the store.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        previous = signal.getsignal(signum)

        def chained(number: int, frame: Any, previous: Any = previous) -> None:
            stop_streams()
            if callable(previous):
                previous(number, frame)

        signal.signal(signum, chained)


def pre_fork(server: Any, worker: Any) -> None:
    # What the master made (the modules above) moves to the permanent generation before each
    # fork, so a worker's collector never writes to those objects and their pages stay shared.
    gc.freeze()


def child_exit(server: Any, worker: Any) -> None:
    # A dead worker's live gauges leave the sums.
    mark_process_dead(getattr(worker, "pid", 0))
