"""Fixed-window rate-limit counters in the event store's own database, as a `limits` storage.

Counts must be shared by every Gunicorn worker (a `memory://` storage keeps one count per
process, so two workers let twice the limit through). Without Redis they live in the
`counters` table of the event store, so an accepted event is counted in the transaction that
stores it (`ingest.ratelimit.Hit.count_in`).
"""

from __future__ import annotations

import time

from limits.storage import Storage

from webhook_server.store.base import STORE_ERRORS, Connection, EventStore


def increment(conn: Connection, key: str, expiry: float, amount: int = 1) -> tuple[int, float]:
    """Add to a fixed-window counter, starting a new window if its last one ended: (count, end)."""
    now = time.time()
    row = conn.execute(
        "INSERT INTO counters (key, count, expires_at) VALUES (?, ?, ?)"
        " ON CONFLICT(key) DO UPDATE SET"
        # Qualified: PostgreSQL finds a bare `count` ambiguous between the row and `excluded`.
        "  count = CASE WHEN counters.expires_at <= ? THEN excluded.count ELSE counters.count + excluded.count END,"
        "  expires_at = CASE WHEN counters.expires_at <= ? THEN excluded.expires_at ELSE counters.expires_at END"
        " RETURNING count, expires_at",
        (key, amount, now + expiry, now, now),
    ).fetchone()
    return int(row[0]), float(row[1])


class StoreCounters(Storage):
    """A fixed-window counter store for `limits` in the event store's `counters` table, so that
    an accepted event and its count are one transaction (`Hit.count_in`): SQLite's file on one
    host, or PostgreSQL's database for replicas on several."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        super().__init__(None)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return STORE_ERRORS

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        # Committed together with the other threads' writes (see GroupWriter).
        count, _ = self.store.writer.run(lambda conn: increment(conn, key, expiry, amount))
        return int(count)

    def get(self, key: str) -> int:
        query = "SELECT count FROM counters WHERE key = ? AND expires_at > ?"
        row = self.store.connection().execute(query, (key, time.time())).fetchone()
        return int(row[0]) if row else 0

    def get_expiry(self, key: str) -> float:
        row = self.store.connection().execute("SELECT expires_at FROM counters WHERE key = ?", (key,)).fetchone()
        return float(row[0]) if row else time.time()

    def check(self) -> bool:
        return self.store.ping()

    def reset(self) -> int | None:
        with self.store.transaction() as conn:
            return int(conn.execute("DELETE FROM counters").rowcount)

    def clear(self, key: str) -> None:
        with self.store.transaction() as conn:
            conn.execute("DELETE FROM counters WHERE key = ?", (key,))

    def purge_expired(self) -> int:
        """Drop windows that ended; the worker calls this now and then."""
        with self.store.transaction() as conn:
            return int(conn.execute("DELETE FROM counters WHERE expires_at <= ?", (time.time(),)).rowcount)
