"""The delivery queue and its worker: at-least-once, with leases, retries and cool-downs.

Accepting an event only inserts it (`events.dispatched = 0`). The worker then, in store
transactions:

1. dispatches new events: the first alert of a kind (source, event, device) opens a
   cool-down window and gets one delivery per recipient; repeats inside the window only
   count;
2. closes windows that ended, turning their repeat count into one summary delivery per
   recipient;
3. claims due deliveries with a lease, sends them, and marks them sent only after the
   SMTP server accepted them. A worker killed mid-send leaves a lease that expires, and
   the delivery is taken over: nothing is lost, at worst sent twice (same Message-ID).
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .config import Settings
from .metrics import record_delivery
from .notify import DeliveryError, Notification, Notifier, PermanentFailure, notifiers, targets
from .ratelimit import SQLiteStorage, storage_uri
from .store import Store, event_from_row

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 3600.0
DISPATCH_BATCH = 500
SEND_CONCURRENCY = 4
HOUSEKEEPING_SECONDS = 60.0


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def backoff(settings: Settings, attempts: int) -> float:
    """base, 2*base, 4*base ... capped at an hour, with ±20% jitter."""
    delay = min(settings.retry_base_seconds * 2 ** max(attempts - 1, 0), MAX_BACKOFF_SECONDS)
    return float(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter, not cryptography


@dataclass(frozen=True)
class DeadLetter:
    delivery_id: int
    event_id: int
    event: str
    channel: str
    recipient: str
    tries: int
    last_error: str


class DeliveryQueue:
    """Queue operations on the store; every method is one short transaction."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    # -- turning events into deliveries -------------------------------------------------

    def dispatch(self) -> int:
        """Apply cool-downs to new events and create their deliveries; returns events handled."""
        conn = self.store.connection()
        if conn.execute("SELECT 1 FROM events WHERE dispatched = 0 LIMIT 1").fetchone() is None:
            return 0
        with self.store.transaction() as conn:
            rows = conn.execute(
                "SELECT * FROM events WHERE dispatched = 0 ORDER BY id LIMIT ?", (DISPATCH_BATCH,)
            ).fetchall()
            for row in rows:
                self._dispatch_one(conn, row)
            conn.executemany("UPDATE events SET dispatched = 1 WHERE id = ?", [(row["id"],) for row in rows])
        return len(rows)

    def _dispatch_one(self, conn: sqlite3.Connection, row: sqlite3.Row) -> None:
        source = self.settings.sources.get(row["source"])
        if source is not None and not source.notify:
            return
        received = epoch(row["received_at"])
        key = (row["source"], row["event"], row["device"])
        window = conn.execute("SELECT * FROM cooldowns WHERE source = ? AND event = ? AND device = ?", key).fetchone()
        if window is not None and received < window["closes_at"]:
            conn.execute(
                "UPDATE cooldowns SET repeats = repeats + 1, last_event_id = ?"
                " WHERE source = ? AND event = ? AND device = ?",
                (row["id"], *key),
            )
            return
        if window is not None:
            self._close_window(conn, window)
        recipients = source.recipients if source is not None else None
        self._add_deliveries(conn, row["id"], "alert", recipients)
        if self.settings.alert_cooldown_seconds > 0:
            conn.execute(
                "INSERT INTO cooldowns (source, event, device, opened_at, closes_at, first_event_id,"
                " last_event_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    *key,
                    received,
                    received + self.settings.alert_cooldown_seconds,
                    row["id"],
                    row["id"],
                ),
            )

    def close_windows(self, now: float | None = None) -> int:
        """Summaries for cool-down windows that have ended; returns windows closed."""
        now = time.time() if now is None else now
        conn = self.store.connection()
        if conn.execute("SELECT 1 FROM cooldowns WHERE closes_at <= ? LIMIT 1", (now,)).fetchone() is None:
            return 0
        with self.store.transaction() as conn:
            # An event still waiting to be dispatched may be a repeat inside a window: close only
            # windows that ended before the oldest such event was received. Under steady load this
            # still closes windows, where "wait until nothing is pending" could wait forever.
            oldest = conn.execute("SELECT received_at FROM events WHERE dispatched = 0 ORDER BY id LIMIT 1").fetchone()
            cutoff = min(now, epoch(oldest[0])) if oldest is not None else now
            windows = conn.execute("SELECT * FROM cooldowns WHERE closes_at <= ?", (cutoff,)).fetchall()
            for window in windows:
                self._close_window(conn, window)
        return len(windows)

    def _close_window(self, conn: sqlite3.Connection, window: sqlite3.Row) -> None:
        conn.execute(
            "DELETE FROM cooldowns WHERE source = ? AND event = ? AND device = ?",
            (window["source"], window["event"], window["device"]),
        )
        if window["repeats"] > 0:
            source = self.settings.sources.get(window["source"])
            recipients = source.recipients if source is not None else None
            self._add_deliveries(
                conn,
                window["last_event_id"],
                "summary",
                recipients,
                window["repeats"],
                window["opened_at"],
            )

    def _add_deliveries(
        self,
        conn: sqlite3.Connection,
        event_id: int,
        kind: str,
        recipients: tuple[str, ...] | None,
        repeats: int = 0,
        window_start: float | None = None,
    ) -> None:
        now = time.time()
        conn.executemany(
            "INSERT INTO deliveries (event_id, kind, channel, recipient, repeats, window_start,"
            " next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (event_id, kind, channel, recipient, repeats, window_start, now, now)
                for channel, recipient in targets(self.settings, recipients)
            ],
        )

    # -- leases and outcomes ------------------------------------------------------------

    def claim(self, limit: int, now: float | None = None) -> list[Notification]:
        """Lease up to `limit` due deliveries. An expired lease is due again."""
        now = time.time() if now is None else now
        conn = self.store.connection()
        due = conn.execute(
            "SELECT 1 FROM deliveries WHERE status = 'pending' AND next_attempt_at <= ? AND lease_until <= ? LIMIT 1",
            (now, now),
        ).fetchone()
        if due is None:
            return []
        with self.store.transaction() as conn:
            rows = conn.execute(
                "UPDATE deliveries SET lease_until = ?, attempts = attempts + 1 WHERE id IN ("
                " SELECT id FROM deliveries WHERE status = 'pending' AND next_attempt_at <= ?"
                " AND lease_until <= ? ORDER BY next_attempt_at, id LIMIT ?) RETURNING *",
                (now + self.settings.delivery_lease_seconds, now, now, limit),
            ).fetchall()
            events = (
                {
                    r["id"]: event_from_row(r)
                    for r in conn.execute(
                        f"SELECT * FROM events WHERE id IN ({','.join('?' * len(rows))})",  # noqa: S608
                        [row["event_id"] for row in rows],
                    )
                }
                if rows
                else {}
            )
        return [self._notification(row, events[row["event_id"]]) for row in rows]

    @staticmethod
    def _notification(row: sqlite3.Row, event: Any) -> Notification:
        return Notification(
            delivery_id=row["id"],
            event=event,
            kind=row["kind"],
            channel=row["channel"],
            recipient=row["recipient"],
            repeats=row["repeats"],
            window_start=row["window_start"],
            attempt=row["attempts"],
        )

    def mark_sent(self, delivery_id: int) -> None:
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE deliveries SET status = 'sent', sent_at = ?, lease_until = 0, last_error = NULL WHERE id = ?",
                (time.time(), delivery_id),
            )

    def mark_failed(self, notification: Notification, error: str, permanent: bool) -> str:
        """Schedule a retry, or make it a dead letter; returns the new status."""
        attempts = notification.attempt
        dead = permanent or attempts >= self.settings.retry_max_attempts
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE deliveries SET status = ?, next_attempt_at = ?, lease_until = 0, last_error = ? WHERE id = ?",
                (
                    "dead" if dead else "pending",
                    time.time() + (0 if dead else backoff(self.settings, attempts)),
                    error[:500],
                    notification.delivery_id,
                ),
            )
        return "dead" if dead else "pending"

    # -- dead letters -------------------------------------------------------------------

    def dead_letters(self) -> list[DeadLetter]:
        rows = (
            self.store.connection()
            .execute(
                "SELECT d.id, d.event_id, e.event, d.channel, d.recipient, d.attempts, d.last_error"
                " FROM deliveries d JOIN events e ON e.id = d.event_id WHERE d.status = 'dead' ORDER BY d.id"
            )
            .fetchall()
        )
        return [DeadLetter(r[0], r[1], r[2], r[3], r[4], r[5], r[6] or "") for r in rows]

    def replay(self, delivery_ids: list[int] | None = None) -> int:
        """Put dead letters back in the queue, as new; None means all. Returns how many."""
        now = time.time()
        with self.store.transaction() as conn:
            if delivery_ids is None:
                cursor = conn.execute(
                    "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?,"
                    " lease_until = 0 WHERE status = 'dead'",
                    (now,),
                )
            else:
                cursor = conn.executemany(
                    "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?,"
                    " lease_until = 0 WHERE status = 'dead' AND id = ?",
                    [(now, i) for i in delivery_ids],
                )
            return cursor.rowcount


def recipient_domain(recipient: str) -> str:
    """What the log may say of a recipient: its domain only (an address is personal data)."""
    return "@" + recipient.rpartition("@")[2] if "@" in recipient else recipient


def log_sent(notification: Notification, since_receipt: float) -> None:
    """One info line per sent delivery, so `logs worker` shows that mail went out."""
    n = notification
    where = "written to the log" if n.channel == "log" else f"sent by {n.channel} to {recipient_domain(n.recipient)}"
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


class Worker:
    """Runs the queue: dispatch, close windows, send what is due. Synchronous `run_once` for tests."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or Store(settings.database_path)
        self.queue = DeliveryQueue(self.store, settings)
        self.notifiers: dict[str, Notifier] = notifiers(settings)
        self._pool = ThreadPoolExecutor(SEND_CONCURRENCY, thread_name_prefix="deliver")

    def run_once(self) -> int:
        """One pass; returns how many events, windows and deliveries it handled."""
        handled = self.queue.dispatch() + self.queue.close_windows()
        batch = self.queue.claim(SEND_CONCURRENCY)
        handled += len(list(self._pool.map(self.deliver, batch)))
        return handled

    def deliver(self, notification: Notification) -> str:
        """Send one delivery and record the outcome: sent, pending (retry) or dead."""
        notifier = self.notifiers[notification.channel]
        try:
            notifier.send(notification)
        except DeliveryError as exc:
            status = self.queue.mark_failed(
                notification, f"{type(exc).__name__}: {exc}", isinstance(exc, PermanentFailure)
            )
            record_delivery(notification.channel, "retry" if status == "pending" else "dead")
            log.warning(
                "delivery %s to %s failed (try %s): %s; now %s",
                notification.delivery_id,
                notification.channel,
                notification.attempt,
                exc,
                status,
            )
            return status
        except Exception as exc:  # a notifier bug must not kill the worker; retry like a glitch
            log.exception("delivery %s: unexpected error", notification.delivery_id)
            status = self.queue.mark_failed(notification, f"{type(exc).__name__}: {exc}", False)
            record_delivery(notification.channel, "retry" if status == "pending" else "dead")
            return status
        self.queue.mark_sent(notification.delivery_id)
        since_receipt = time.time() - epoch(notification.event.received_at)
        # A summary's event was received up to a whole window earlier: only alerts time the pipeline.
        record_delivery(notification.channel, "sent", since_receipt if notification.kind == "alert" else None)
        log_sent(notification, since_receipt)
        return "sent"

    def housekeeping(self) -> None:
        """Drop rate-limit windows that ended, so the counters file stays small."""
        if self.settings.redis_url:
            return  # Redis expires its own keys
        storage = SQLiteStorage(storage_uri(self.settings.database_path, None))
        removed = storage.purge_expired()
        if removed:
            log.debug("purged %s expired rate-limit counters", removed)

    def run(self, stop: threading.Event) -> None:
        """Loop until `stop` is set; a store error is logged and retried, never fatal."""
        log.info("delivery worker started (poll every %ss)", self.settings.worker_poll_seconds)
        next_housekeeping = 0.0
        while not stop.is_set():
            try:
                busy = self.run_once()
                # The web processes leave WAL checkpoints to us (see store.Checkpointer).
                self.store.checkpointer.maybe(self.store.connection())
                if time.monotonic() >= next_housekeeping:
                    self.housekeeping()
                    next_housekeeping = time.monotonic() + HOUSEKEEPING_SECONDS
            except sqlite3.Error as exc:
                log.error("store error in worker: %s", exc)
                busy = 0
            if not busy:
                stop.wait(self.settings.worker_poll_seconds)
        self._pool.shutdown(wait=True)
        log.info("delivery worker stopped")
