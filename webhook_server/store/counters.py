"""Fixed-window rate-limit counters in the store's own SQLite file, as a `limits` storage.

Counts must be shared by every Gunicorn worker (a `memory://` storage keeps one count per
process, so two workers let twice the limit through). Without Redis they live in the
`counters` table of the event store, so an accepted event is counted in the transaction that
stores it (`ingest.ratelimit.Hit.count_in`).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

from limits.storage import Storage

from webhook_server.store.group import GroupWriter, write_retrying
from webhook_server.store.sqlite import answers, connect, create_schema


def increment(conn: sqlite3.Connection, key: str, expiry: float, amount: int = 1) -> tuple[int, float]:
    """Add to a fixed-window counter, starting a new window if its last one ended: (count, end)."""
    now = time.time()
    row = conn.execute(
        "INSERT INTO counters (key, count, expires_at) VALUES (?, ?, ?)"
        " ON CONFLICT(key) DO UPDATE SET"
        "  count = CASE WHEN expires_at <= ? THEN excluded.count ELSE count + excluded.count END,"
        "  expires_at = CASE WHEN expires_at <= ? THEN excluded.expires_at ELSE expires_at END"
        " RETURNING count, expires_at",
        (key, amount, now + expiry, now, now),
    ).fetchone()
    return int(row[0]), float(row[1])


class SQLiteStorage(Storage):
    """A fixed-window counter store for `limits`, shared by every process on the host.

    URI: ``sqlite:///absolute/path/file.sqlite3``. The server points it at the event store's
    own file, so that an accepted event and its count are one transaction (`Hit.count_in`).
    """

    STORAGE_SCHEME = ["sqlite"]

    def __init__(self, uri: str, wrap_exceptions: bool = False, **options: float | str | bool) -> None:
        self.path = Path(unquote(urlparse(uri).path))
        self._local = threading.local()
        self._write_lock = threading.Lock()
        # No checkpoints from here: the event store's writers and the delivery worker make them.
        self._writer = GroupWriter(self._connection, None)
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        create_schema(self._connection(), self._write_lock)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return sqlite3.Error

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():  # none, or the parent's
            # No waiting in SQLite's busy handler: GroupWriter and write_retrying retry in short steps.
            conn = connect(self.path, 0, self._write_lock)
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        # Committed together with the other threads' increments (see GroupWriter).
        count, _ = self._writer.run(lambda conn: increment(conn, key, expiry, amount))
        return count

    def get(self, key: str) -> int:
        row = (
            self._connection()
            .execute("SELECT count FROM counters WHERE key = ? AND expires_at > ?", (key, time.time()))
            .fetchone()
        )
        return int(row[0]) if row else 0

    def get_expiry(self, key: str) -> float:
        row = self._connection().execute("SELECT expires_at FROM counters WHERE key = ?", (key,)).fetchone()
        return float(row[0]) if row else time.time()

    def check(self) -> bool:
        return answers(self._connection)

    def reset(self) -> int | None:
        cursor = self._connection().execute("DELETE FROM counters")
        return cursor.rowcount

    def clear(self, key: str) -> None:
        self._connection().execute("DELETE FROM counters WHERE key = ?", (key,))

    def purge_expired(self) -> int:
        """Drop windows that ended; the worker calls this now and then."""
        conn = self._connection()
        return write_retrying(
            self._write_lock,
            lambda: conn.execute("DELETE FROM counters WHERE expires_at <= ?", (time.time(),)).rowcount,
        )


def storage_uri(database_path: Path, redis_url: str | None) -> str:
    """Redis when configured, else the event store's own SQLite file."""
    if redis_url:
        return redis_url
    return f"sqlite:///{quote(str(database_path.resolve()))}"  # a '#' or '%' in DATA_DIR stays itself
