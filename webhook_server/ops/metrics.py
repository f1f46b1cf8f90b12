"""Prometheus metrics, right whichever Gunicorn worker answers the scrape (the endpoint and the
request hooks are in `ops.metrics_endpoint`, so that the delivery worker needs no Flask).

Two modes, chosen once per process when the first metric is made:

* **Multiprocess** (``PROMETHEUS_MULTIPROC_DIR`` set, as ``webhook-server serve``, ``web`` and
  ``worker`` do: they set it to ``<DATA_DIR>/prometheus`` when it is not already set). Every
  process, each Gunicorn worker and the delivery worker alike, writes its counts to its own
  files in that directory, and a scrape adds up the files of every process. Counts stay right
  when Gunicorn restarts a worker: a dead worker's counter files stay, and Gunicorn's
  ``child_exit`` hook (`gunicorn_conf`) calls `mark_process_dead` so its ``live*`` gauges
  leave the sum. The directory is cleared when Gunicorn starts (`clear_stale_files`, from the
  ``on_starting`` hook): the files of processes that are gone would otherwise pile up.
  Files are named after ``<host>-<pid>`` (`process_identifier`), not the bare pid, so that
  a web container and a worker container sharing DATA_DIR (each with its own pid numbering)
  never write to the same file.

* **Single process** (no such variable, e.g. plain ``gunicorn "webhook_server:create_app()"``
  or the tests' client): an ordinary registry in this process. With several Gunicorn workers
  each scrape then shows the counts of the one worker that answered it, so run through
  ``webhook-server web`` (or set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory and use
  ``-c python:webhook_server.gunicorn_conf``) when the counters matter.

The gauges about the queue (`StoreCollector`) are read from the store at scrape time, so they
are exact in either mode and whichever process scrapes.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os
import re
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from webhook_server.store.base import STORE_ERRORS, EventStore
from webhook_server.store.sqlite import make_private_dir

log = logging.getLogger(__name__)

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"
# The classic text format, which every Prometheus version reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# From receipt to the SMTP server's acceptance: seconds normally, up to the retry cap (1 h).
DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

DELIVERY_OUTCOMES = {"sent": "sent", "retry": "retry", "pending": "retry", "dead": "dead"}


# -- where the counts live ------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    """The multiprocess directory from the environment, or None for single-process mode."""
    return os.environ.get(ENV_VAR) or None


def default_multiprocess_dir(data_dir: Path) -> Path:
    """Where the CLI puts the multiprocess files when the variable is not set."""
    return data_dir / "prometheus"


def ensure_multiprocess_dir(data_dir: Path, clear: bool = False) -> Path:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` (to ``<DATA_DIR>/prometheus`` unless already set) and
    create it. Call it before any child process starts and before the first metric is made.

    `clear` deletes every file this host left there, for a command that starts all of this
    host's processes itself (``serve``): none of them runs yet.
    """
    path = Path(os.environ.get(ENV_VAR) or default_multiprocess_dir(data_dir)).resolve()
    make_private_dir(path)
    os.environ[ENV_VAR] = str(path)
    if clear:
        clear_stale_files(str(path), keep_live=False)
    return path


_HOST = re.sub(r"[^A-Za-z0-9.]", "", socket.gethostname())[:64] or "host"


def process_identifier(pid: int | None = None) -> str:
    """The name of a process's files: ``<host>-<pid>`` (no ``_``: the file name is split on it)."""
    return f"{_HOST}-{os.getpid() if pid is None else pid}"


def _identifier_of(path: str) -> tuple[str, int] | None:
    """(host, pid) from a file name such as ``counter_myhost-42.db``."""
    stem = os.path.basename(path)[: -len(".db")]
    host, _, pid = stem.rsplit("_", 1)[-1].rpartition("-")
    return (host, int(pid)) if host and pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale_files(path: str | None = None, keep_live: bool = True) -> int:
    """Delete the files of processes that are gone; returns how many (Gunicorn's ``on_starting``).

    Everything from an earlier run goes, while a delivery worker that started before Gunicorn
    (``serve`` starts both at once) keeps its files (unless `keep_live` is false). Files from
    other hosts (containers sharing DATA_DIR) are left alone: whether they live cannot be told.
    """
    path = path or multiprocess_dir()
    if not path or not os.path.isdir(path):
        return 0
    removed = 0
    for name in glob.glob(os.path.join(path, "*.db")):
        owner = _identifier_of(name)
        if owner is not None and (owner[0] != _HOST or (keep_live and _alive(owner[1]))):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)
            removed += 1
    return removed


def child_exit(pid: int) -> None:
    """Take a dead Gunicorn worker's ``live*`` gauges out of the sums (``child_exit`` hook)."""
    path = multiprocess_dir()
    if path and os.path.isdir(path):
        mark_process_dead(process_identifier(pid), path)  # type: ignore[no-untyped-call]


# -- the instruments --------------------------------------------------------------------------

_REGISTRY = CollectorRegistry()  # single-process mode only
# Instruments are made once per process, on first use, from any thread (Gunicorn's gthread
# workers, the delivery worker's send pool): a lock keeps them from being made twice.
_LOCK = threading.Lock()
_web: WebMetrics | None = None
_deliveries: DeliveryMetrics | None = None


@functools.cache
def _value_class() -> None:
    """In multiprocess mode, name each process's files with `process_identifier`.

    prometheus_client picks its value class when it is imported; the CLI may set the variable
    later in the same process (`webhook-server worker`), so the choice is made again here,
    before the first metric.
    """
    # The *_created samples exist only in single-process mode; leave them out in both.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    if multiprocess_dir():
        Path(multiprocess_dir() or ".").mkdir(parents=True, exist_ok=True)
        values.ValueClass = values.MultiProcessValue(process_identifier)  # type: ignore[no-untyped-call]
    else:
        values.ValueClass = values.MutexValue


@dataclass(frozen=True)
class WebMetrics:
    requests: Counter
    ack_seconds: Histogram
    live_subscribers: Gauge
    live_events: Counter
    live_overflows: Counter


@dataclass(frozen=True)
class DeliveryMetrics:
    deliveries: Counter
    delivery_seconds: Histogram
    forwards: Counter
    forward_seconds: Histogram


def web_metrics() -> WebMetrics:
    """The web half's instruments, made on first use (after the CLI set the environment)."""
    global _web
    if _web is None:
        with _LOCK:
            if _web is None:
                _web = _make_web_metrics()
    return _web


def delivery_metrics() -> DeliveryMetrics:
    """The delivery worker's instruments, made on first use."""
    global _deliveries
    if _deliveries is None:
        with _LOCK:
            if _deliveries is None:
                _deliveries = _make_delivery_metrics()
    return _deliveries


def _make_web_metrics() -> WebMetrics:
    _value_class()
    return WebMetrics(
        requests=Counter(
            "webhook_requests",
            "Webhook requests answered, by source and outcome.",
            ["source", "outcome"],
            registry=_REGISTRY,
        ),
        ack_seconds=Histogram(
            "webhook_ack_seconds",
            "Time to answer a webhook POST, in seconds.",
            buckets=ACK_BUCKETS,
            registry=_REGISTRY,
        ),
        # livesum: the sum over live processes; a dead worker's subscribers leave the sum
        # when Gunicorn's child_exit hook marks it dead.
        live_subscribers=Gauge(
            "webhook_live_subscribers",
            "Live stream (WebSocket and SSE) subscribers connected now, by channel asked for.",
            ["channel"],
            multiprocess_mode="livesum",
            registry=_REGISTRY,
        ),
        live_events=Counter(
            "webhook_live_events",
            "Events sent to live stream subscribers, by transport (sse, ws).",
            ["transport"],
            registry=_REGISTRY,
        ),
        live_overflows=Counter(
            "webhook_live_overflow_disconnects",
            "Subscribers disconnected because they could not keep up, by transport.",
            ["transport"],
            registry=_REGISTRY,
        ),
    )


def _make_delivery_metrics() -> DeliveryMetrics:
    _value_class()
    return DeliveryMetrics(
        deliveries=Counter(
            "webhook_deliveries",
            "Delivery attempts, by channel and outcome (sent, retry, dead).",
            ["channel", "outcome"],
            registry=_REGISTRY,
        ),
        delivery_seconds=Histogram(
            "webhook_delivery_seconds",
            "Time from an event's receipt to its delivery being sent, in seconds.",
            ["channel"],
            buckets=DELIVERY_BUCKETS,
            registry=_REGISTRY,
        ),
        forwards=Counter(
            "webhook_forwards",
            "Forwarding attempts, by target and outcome (sent, retry, dead).",
            ["target", "outcome"],
            registry=_REGISTRY,
        ),
        forward_seconds=Histogram(
            "webhook_forward_seconds",
            "Time from an event's receipt to its target's 2xx answer, in seconds, by target.",
            ["target"],
            buckets=DELIVERY_BUCKETS,
            registry=_REGISTRY,
        ),
    )


def record_delivery(
    channel: str, outcome: str, latency_seconds: float | None = None, target: str | None = None
) -> None:
    """Count one delivery attempt; `outcome` is sent, retry (or pending) or dead. A forward
    (`target` given) is also counted by target.

    `latency_seconds` (receipt to sent) goes into ``webhook_delivery_seconds`` (and
    ``webhook_forward_seconds``) when given. Never raises: a metrics problem must not stop deliveries.
    """
    try:
        instruments = delivery_metrics()
        label = DELIVERY_OUTCOMES.get(outcome, outcome)
        # The latency first: a scrape in between then never shows a sent delivery without it.
        if latency_seconds is not None:
            instruments.delivery_seconds.labels(channel).observe(max(latency_seconds, 0.0))
            if target is not None:
                instruments.forward_seconds.labels(target).observe(max(latency_seconds, 0.0))
        instruments.deliveries.labels(channel, label).inc()
        if target is not None:
            instruments.forwards.labels(target, label).inc()
    except Exception:  # metrics are best effort
        log.warning("could not record a delivery metric", exc_info=True)


@contextlib.contextmanager
def live_subscriber(channel: str) -> Iterator[None]:
    """Count a live stream subscriber of `channel` (as asked: "*", "particle,github") while the block runs."""
    gauge = web_metrics().live_subscribers.labels(channel[:100])
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


def record_streamed(transport: str, events: int = 1, overflow: bool = False) -> None:
    """Count events sent to a subscriber, or its overflow disconnect. Never raises."""
    try:
        instruments = web_metrics()
        if events:
            instruments.live_events.labels(transport).inc(events)
        if overflow:
            instruments.live_overflows.labels(transport).inc()
    except Exception:  # metrics are best effort
        log.warning("could not record a live stream metric", exc_info=True)


# -- scrape-time gauges from the store --------------------------------------------------------


class StoreCollector(Collector):
    """Queue figures read from the store when scraped: exact whichever process answers."""

    def __init__(self, store: EventStore) -> None:
        self.store = store

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("webhook_store_up", "1 when the event store answered this scrape.")
        try:
            counts = self.store.counts()
        except STORE_ERRORS:
            log.warning("metrics: the store did not answer", exc_info=True)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [
            up,
            CounterMetricFamily(
                "webhook_events_accepted",
                "Events accepted and stored since the store was created.",
                value=counts["events_accepted"],
            ),
            GaugeMetricFamily(
                "webhook_queue_depth",
                "Deliveries waiting to be sent (including those waiting to retry).",
                value=counts["deliveries_pending"],
            ),
            GaugeMetricFamily(
                "webhook_dead_letters",
                "Deliveries that ran out of retries, waiting for an operator to replay them.",
                value=counts["dead_letters"],
            ),
        ]


class _Local(Collector):
    """This process's own registry, in single-process mode."""

    def collect(self) -> Iterable[Metric]:
        return _REGISTRY.collect()


def render(store: EventStore) -> bytes:
    """The exposition text: every process's counts plus the store's gauges."""
    web_metrics()
    delivery_metrics()
    registry = CollectorRegistry()
    path = multiprocess_dir()
    if path and os.path.isdir(path) and values.ValueClass is not values.MutexValue:
        MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Local())
    registry.register(StoreCollector(store))
    return generate_latest(registry)
