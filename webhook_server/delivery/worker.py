"""The delivery worker: dispatch, close windows, send what is due, record each outcome."""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Protocol

from webhook_server.delivery.cooldowns import epoch
from webhook_server.delivery.forwarding import ForwardLoop
from webhook_server.delivery.queue import DeliveryQueue
from webhook_server.live.doorbell import Doorbell
from webhook_server.live.redis_bell import RedisBell
from webhook_server.notify import DeliveryError, Notifier, PermanentFailure, TemporaryFailure, notifiers
from webhook_server.ops.metrics import record_delivery
from webhook_server.settings import Settings
from webhook_server.store.base import STORE_ERRORS, EventStore
from webhook_server.store.counters import StoreCounters
from webhook_server.store.extension import WORKER_POOL_SIZE, open_store
from webhook_server.store.records import Notification
from webhook_server.store.retention import Purged, purge

log = logging.getLogger(__name__)

SEND_CONCURRENCY = 4
MIN_PASS_SECONDS = 0.02  # a woken worker's passes: at most 50 a second
HOUSEKEEPING_SECONDS = 60.0
# The first pass waits a little, so a restart first sends what queued up while it was down.
FIRST_HOUSEKEEPING_SECONDS = 5.0
# A pass that stopped at its bound with old rows left (a large backlog) is followed sooner.
CATCH_UP_SECONDS = 2.0


def recipient_domain(recipient: str) -> str:
    """What the log may say of a recipient: its domain only (an address is personal data)."""
    return "@" + recipient.rpartition("@")[2] if "@" in recipient else recipient


def log_sent(notification: Notification, since_receipt: float) -> None:
    """One info line per sent delivery, so `logs worker` shows that mail went out."""
    n = notification
    if n.channel == "log":
        where = "written to the log"
    elif n.channel == "http":
        where = f"sent to target {n.recipient}"
    else:
        where = f"sent by {n.channel} to {recipient_domain(n.recipient)}"
    log.info(
        "%s %s for event %s %s (try %s, %.2f s after receipt)",
        n.kind,
        n.delivery_id,
        n.event.id,
        where,
        n.attempt,
        since_receipt,
        extra={
            "delivery_id": n.delivery_id,
            "event_id": n.event.id,
            "channel": n.channel,
            "recipient_domain": recipient_domain(n.recipient),
            "tries": n.attempt,
            "latency_ms": round(since_receipt * 1000, 1),
        },
    )


def log_purged(purged: Purged) -> None:
    """One info line per housekeeping pass that removed anything."""
    log.info(
        "retention removed %s events, %s deliveries and %s audit records",
        purged.events,
        purged.deliveries,
        purged.audit,
        extra={"events": purged.events, "deliveries": purged.deliveries, "audit_records": purged.audit},
    )


def where(notification: Notification) -> str:
    """A delivery's way out for the log: the channel, and a forwarding target's name (never its URL)."""
    return f"target {notification.recipient}" if notification.channel == "http" else notification.channel


def record_outcome(notification: Notification, outcome: str, latency: float | None = None) -> None:
    """The delivery metrics by channel, and a forward's by target too."""
    target = notification.recipient if notification.channel == "http" else None
    record_delivery(notification.channel, outcome, latency, target)


class Stopper(Protocol):
    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class SignalStop:
    """A stop request that a signal handler may make: no lock is taken.

    `threading.Event.set` takes a lock that is not reentrant; a second signal arriving while a
    first handler held it (Ctrl-C reaches the worker from the terminal and again from the
    supervisor) deadlocked the worker for good.
    """

    def __init__(self) -> None:
        self._stopping = False
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)

    def set(self, *_: object) -> None:
        """Usable as a signal handler."""
        self._stopping = True
        with suppress(BlockingIOError):  # the pipe is full: a wake-up is already waiting
            os.write(self._write, b"x")

    def is_set(self) -> bool:
        return self._stopping

    def wait(self, timeout: float | None = None, wake: socket.socket | None = None) -> bool:
        """Until stopped, `timeout` passed, or (given) a datagram on `wake`, which is drained."""
        if not self._stopping:
            watched = [self._read] if wake is None else [self._read, wake.fileno()]
            ready, _, _ = select.select(watched, [], [], timeout)
            if wake is not None and wake.fileno() in ready:
                drain(wake)
        return self._stopping


def drain(sock: socket.socket) -> None:
    """Read every datagram waiting: one pass of the worker answers them all."""
    with suppress(BlockingIOError, OSError):
        while sock.recv(16):
            pass


class Worker:
    """Runs the queue: dispatch, close windows, send what is due. Synchronous `run_once` for tests.

    `clock` (seconds since the epoch) is the queue's clock too; tests pass a fake one.
    """

    def __init__(
        self, settings: Settings, store: EventStore | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.store = store or open_store(settings.database_url, settings.database_path, WORKER_POOL_SIZE)
        self.clock = clock
        self.queue = DeliveryQueue(self.store, settings, clock)
        self.notifiers: dict[str, Notifier] = notifiers(settings)
        self._pool = ThreadPoolExecutor(SEND_CONCURRENCY, thread_name_prefix="deliver")
        self.forwarding = ForwardLoop(self.queue, settings.targets, self.deliver)

    def run_once(self) -> int:
        """One pass of everything, waiting for its sends; how many events, windows and deliveries
        it handled. `run` does the same with forwarding in a thread of its own."""
        return self.notify_once() + self.forwarding.pass_once(wait_for_sends=True)

    def notify_once(self) -> int:
        """Dispatch new events, close ended windows, send due email/SMS/log deliveries."""
        handled = self.queue.dispatch() + self.queue.close_windows()
        batch = self.queue.claim(SEND_CONCURRENCY)
        handled += len(list(self._pool.map(self.deliver, batch)))
        if handled and self.settings.targets:
            self.forwarding.wake.set()  # a dispatch may have queued forwards
        return handled

    def deliver(self, notification: Notification) -> str:
        """Send one delivery and record the outcome: sent, pending (retry) or dead."""
        notifier = self.notifiers[notification.channel]
        try:
            notifier.send(notification)
        except DeliveryError as exc:
            wait = exc.retry_after if isinstance(exc, TemporaryFailure) else None
            status = self.queue.mark_failed(
                notification, f"{type(exc).__name__}: {exc}", isinstance(exc, PermanentFailure), wait
            )
            record_outcome(notification, "retry" if status == "pending" else "dead")
            log.warning(
                "delivery %s to %s failed (try %s): %s; now %s",
                notification.delivery_id,
                where(notification),
                notification.attempt,
                exc,
                status,
            )
            return status
        except Exception as exc:  # a notifier bug must not kill the worker; retry like a glitch
            log.exception("delivery %s: unexpected error", notification.delivery_id)
            status = self.queue.mark_failed(notification, f"{type(exc).__name__}: {exc}", False)
            record_outcome(notification, "retry" if status == "pending" else "dead")
            return status
        self.queue.mark_sent(notification.delivery_id)
        since_receipt = self.clock() - epoch(notification.event.received_at)
        # A summary's event was received up to a whole window earlier: only alerts time the pipeline.
        record_outcome(notification, "sent", since_receipt if notification.kind != "summary" else None)
        log_sent(notification, since_receipt)
        return "sent"

    def housekeeping(self) -> bool:
        """Retention, and expired rate-limit windows; True when old rows are left for another pass."""
        buried = self.queue.bury_forwards_without_target()
        if buried:
            log.warning("%s pending forwards to targets no longer configured are now dead letters", buried)
        purged = purge(self.store, self.settings.event_retention_days, self.settings.audit_retention_days, self.clock())
        if purged.removed:
            log_purged(purged)
        # With Redis the rate limits live there, but the audit's per-minute counts stay here.
        removed = StoreCounters(self.store).purge_expired()
        if removed:
            log.debug("purged %s expired counters", removed)
        return purged.more

    def run(self, stop: Stopper) -> None:
        """Loop until `stop` is set; a store error is logged and retried, never fatal. Anything
        else ends the process (its supervisor restarts it), forwarding included."""
        log.info("delivery worker started (poll every %ss)", self.settings.worker_poll_seconds)
        halted = threading.Event()
        # The web processes ring DATA_DIR/live after each event they store (and, with REDIS_URL,
        # publish it for other hosts): the worker answers at once rather than at its next look
        # (WORKER_POLL_SECONDS), which it still takes.
        redis_url = self.settings.redis_url
        bell = Doorbell(self.settings.data_dir / "live", RedisBell(redis_url) if redis_url else None)
        self._wake = bell.listen()
        self._wake.setblocking(False)
        forwarding = threading.Thread(
            target=self.forwarding.run,
            args=(lambda: stop.is_set() or halted.is_set(), self.settings.worker_poll_seconds),
            name="forwarding",
        )
        forwarding.start()
        try:
            self._loop(stop)
        finally:
            halted.set()
            self.forwarding.wake.set()
            self._pool.shutdown(wait=True)
            forwarding.join()
            bell.close()
            self._wake.close()
        log.info("delivery worker stopped")

    def _loop(self, stop: Stopper) -> None:
        next_housekeeping = time.monotonic() + FIRST_HOUSEKEEPING_SECONDS
        failing = False  # said in the log once a failure begins, and once it ends: not each pass
        while not stop.is_set():
            self._last_pass = time.monotonic()
            try:
                busy = self.notify_once()
                # The web processes leave SQLite's WAL checkpoints to us (see store.Checkpointer).
                self.store.checkpoint()
                if time.monotonic() >= next_housekeeping:
                    more = self.housekeeping()
                    next_housekeeping = time.monotonic() + (CATCH_UP_SECONDS if more else HOUSEKEEPING_SECONDS)
            except STORE_ERRORS as exc:
                if not failing:
                    log.error("store error in worker: %s; trying again each pass", exc)
                failing, busy = True, 0
            else:
                if failing:
                    log.warning("the store answers the worker again")
                failing = False
            if not busy:
                self._idle(stop)

    def _idle(self, stop: Stopper) -> None:
        """Wait for the poll interval, a stop, or the doorbell (a new event), whichever is first;
        then, if the last pass began less than MIN_PASS_SECONDS ago, for the rest of that."""
        poll = self.settings.worker_poll_seconds
        if isinstance(stop, SignalStop):
            stop.wait(poll, wake=self._wake)
        else:  # a test's threading.Event
            ready, _, _ = select.select([self._wake], [], [], poll)
            if ready:
                drain(self._wake)
        # Under a stream of events every one rang: a pass per event cost ingest 4% (a write
        # transaction each, against the web's). Passes at most this often batch them again.
        time.sleep(max(0.0, self._last_pass + MIN_PASS_SECONDS - time.monotonic()))
