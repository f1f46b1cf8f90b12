"""The delivery queue in the store: at-least-once, with leases, retries and dead letters.

Accepting an event only inserts it (`events.dispatched = 0`). The worker then, in store
transactions:

1. dispatches new events through the cool-downs (`delivery.cooldowns`): one delivery per
   recipient for an alert, none for a repeat inside a window;
2. closes windows that ended, each with repeats becoming one summary delivery per recipient;
3. claims due deliveries with a lease, sends them, and marks them sent only after the
   server accepted them. A worker killed mid-send leaves a lease that expires, and the
   delivery is taken over: nothing is lost, at worst sent twice (same Message-ID).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from webhook_server.delivery.cooldowns import Cooldowns
from webhook_server.ingest.targets import Target
from webhook_server.notify import targets
from webhook_server.settings import Settings
from webhook_server.store.base import Connection, EventStore, Row
from webhook_server.store.records import Notification, event_from_row

MAX_BACKOFF_SECONDS = 3600.0
DISPATCH_BATCH = 500


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
    """Queue operations on the store; every method is one short transaction.

    `clock` is where every method reads the time (seconds since the epoch); tests pass a fake one.
    """

    def __init__(self, store: EventStore, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.cooldowns = Cooldowns(settings, self.add_deliveries)

    # -- turning events into deliveries -------------------------------------------------

    def dispatch(self) -> int:
        """Apply cool-downs to new events and create their deliveries; returns events handled."""
        conn = self.store.connection()
        if conn.execute("SELECT 1 FROM events WHERE dispatched = 0 LIMIT 1").fetchone() is None:
            return 0
        with self.store.transaction() as conn:
            if not self.store.take_turn(conn, "cooldowns"):  # one worker at a time: windows see events in order
                return 0
            rows = conn.execute(
                "SELECT * FROM events WHERE dispatched = 0 ORDER BY id LIMIT ?", (DISPATCH_BATCH,)
            ).fetchall()
            for row in rows:
                self.cooldowns.admit(conn, row)
                self.add_forwards(conn, row["id"], row["source"], row["event"])
            conn.executemany("UPDATE events SET dispatched = 1 WHERE id = ?", [(row["id"],) for row in rows])
        return len(rows)

    def add_forwards(self, conn: Connection, event_id: int, source: str, event: str) -> int:
        """One `http` delivery per target that takes this event (no cool-down: each is passed on)."""
        now = self.clock()
        chosen = [t.name for t in self.settings.targets.values() if t.takes(source, event)]
        conn.executemany(
            "INSERT INTO deliveries (event_id, kind, channel, recipient, next_attempt_at, created_at)"
            " VALUES (?, 'forward', 'http', ?, ?, ?)",
            [(event_id, name, now, now) for name in chosen],
        )
        return len(chosen)

    def close_windows(self, now: float | None = None) -> int:
        """Summaries for cool-down windows that have ended; returns windows closed."""
        now = self.clock() if now is None else now
        conn = self.store.connection()
        if conn.execute("SELECT 1 FROM cooldowns WHERE closes_at <= ? LIMIT 1", (now,)).fetchone() is None:
            return 0
        with self.store.transaction() as conn:
            if not self.store.take_turn(conn, "cooldowns"):
                return 0
            return self.cooldowns.close_ended(conn, now)

    def add_deliveries(
        self,
        conn: Connection,
        event_id: int,
        kind: str,
        recipients: tuple[str, ...] | None,
        repeats: int = 0,
        window_start: float | None = None,
    ) -> int:
        """One delivery per (channel, recipient) of an alert or a summary; returns how many."""
        now = self.clock()
        rows = [
            (event_id, kind, channel, recipient, repeats, window_start, now, now)
            for channel, recipient in targets(self.settings, recipients)
        ]
        conn.executemany(
            "INSERT INTO deliveries (event_id, kind, channel, recipient, repeats, window_start,"
            " next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        return len(rows)

    def replay_event(self, event_id: int) -> int | None:
        """The event's notifications and forwarding again, as new deliveries past any cool-down;
        how many, or None when there is no such event. A replay sends what arrival would, by the
        configuration as it is now: no notification when the source does not notify this event
        (notify = false, or its `events` filter), a forward to each target that takes it."""
        with self.store.transaction() as conn:
            row = conn.execute("SELECT source, event FROM events WHERE id = ?", (event_id,)).fetchone()
            if row is None:
                return None
            source = self.settings.sources.get(row["source"])
            added = 0
            if source is None or source.notifies(row["event"]):
                added = self.add_deliveries(conn, event_id, "alert", source.recipients if source is not None else None)
            return added + self.add_forwards(conn, event_id, row["source"], row["event"])

    def bury_forwards_without_target(self) -> int:
        """Pending forwards to a target no longer in SOURCES_FILE become dead letters (nothing would
        ever claim them, and retention keeps every event from the oldest pending delivery on)."""
        names = sorted(self.settings.targets)
        marks = ",".join("?" * len(names))
        bury = (
            "UPDATE deliveries SET status = 'dead', lease_until = 0,"  # noqa: S608 - marks are only ?s
            " last_error = 'PermanentFailure: no target named ' || recipient || ' is configured now'"
            f" WHERE status = 'pending' AND channel = 'http' AND {f'recipient NOT IN ({marks})' if names else '1 = 1'}"
        )
        with self.store.transaction() as conn:
            return int(conn.execute(bury, names).rowcount)

    # -- leases and outcomes ------------------------------------------------------------

    def claim(self, limit: int, now: float | None = None) -> list[Notification]:
        """Lease up to `limit` due notifications (not forwards). An expired lease is due again."""
        now = self.clock() if now is None else now
        due = (
            "SELECT id FROM deliveries WHERE status = 'pending' AND next_attempt_at <= ? AND lease_until <= ?"
            " AND channel != 'http' ORDER BY next_attempt_at, id LIMIT ?"
        )
        if self.store.connection().execute(due, (now, now, 1)).fetchone() is None:
            return []
        # Workers on several hosts take different rows (SKIP LOCKED) rather than wait for each other.
        return self._lease(
            due + self.store.skip_locked, (now, now, limit), now, now + self.settings.delivery_lease_seconds
        )

    def claim_forwards(self, target: Target, limit: int, now: float | None = None) -> list[Notification]:
        """Lease up to `limit` due forwards to `target`; for an ordered target only its oldest
        pending one, and only when it is due: a failing head holds back the rest."""
        now = self.clock() if now is None else now
        if target.ordered:
            due = (
                "SELECT id FROM (SELECT id, next_attempt_at, lease_until FROM deliveries"
                " WHERE status = 'pending' AND channel = 'http' AND recipient = ? ORDER BY id LIMIT 1) AS head"
                " WHERE next_attempt_at <= ? AND lease_until <= ? AND ? > 0"
            )
        else:
            due = (
                "SELECT id FROM deliveries WHERE status = 'pending' AND channel = 'http' AND recipient = ?"
                " AND next_attempt_at <= ? AND lease_until <= ? ORDER BY next_attempt_at, id LIMIT ?"
            )
        params = (target.name, now, now, limit)
        if self.store.connection().execute(due, params).fetchone() is None:
            return []
        # A try never outlasts timeout_seconds (channels.http.Deadline): the lease is that and a margin.
        lease = max(self.settings.delivery_lease_seconds, target.timeout_seconds + 15)
        # An ordered target's head is never skipped: a worker that finds it leased takes nothing.
        return self._lease(due if target.ordered else due + self.store.skip_locked, params, now, now + lease)

    def _lease(self, due: str, params: tuple[Any, ...], now: float, until: float) -> list[Notification]:
        """Lease the deliveries `due` selects, with their events. The lease is checked again on the
        row itself: another worker's lease taken meanwhile leaves it out (PostgreSQL re-reads a row
        that was updated while this statement waited for it).

        `due` runs once, in a MATERIALIZED CTE: as a plain `IN (subquery)` PostgreSQL may scan it
        again, and with SKIP LOCKED each scan gave other rows, so a claim of 7 leased 13.
        """
        with self.store.transaction() as conn:
            rows = conn.execute(
                f"WITH picked AS MATERIALIZED ({due}) UPDATE deliveries SET lease_until = ?,"  # noqa: S608
                " attempts = attempts + 1 WHERE id IN (SELECT id FROM picked) AND status = 'pending'"
                " AND lease_until <= ? RETURNING *",
                (*params, until, now),
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
    def _notification(row: Row, event: Any) -> Notification:
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
                (self.clock(), delivery_id),
            )

    def mark_failed(
        self, notification: Notification, error: str, permanent: bool, at_least: float | None = None
    ) -> str:
        """Schedule a retry (after the backoff, or `at_least` seconds when the far end asked for
        more: Retry-After), or make it a dead letter; returns the new status."""
        attempts = notification.attempt
        dead = permanent or attempts >= self.settings.retry_max_attempts
        delay = 0.0 if dead else max(backoff(self.settings, attempts), at_least or 0.0)
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE deliveries SET status = ?, next_attempt_at = ?, lease_until = 0, last_error = ? WHERE id = ?",
                ("dead" if dead else "pending", self.clock() + delay, error[:500], notification.delivery_id),
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
        now = self.clock()
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
            return int(cursor.rowcount)
