"""Rate limits per source and client address, with `limits` (the engine under flask-limiter).

Counts must be shared by every Gunicorn worker (flask-limiter's `memory://` keeps one count
per process, so two workers let twice the limit through). Without Redis the counters live in
a table of the event store's SQLite file; with REDIS_URL they live in Redis.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

from flask import Flask, current_app
from limits import RateLimitItem, parse_many
from limits.storage import Storage, storage_from_string
from limits.strategies import FixedWindowRateLimiter

from .errors import RateLimited
from .sources import Source
from .store import GroupWriter, make_private, write_retrying

log = logging.getLogger(__name__)

EXTENSION_KEY = "webhook_limiter"


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
        conn = self._connection()
        write_retrying(
            self._write_lock,
            lambda: conn.execute(
                "CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, count INTEGER NOT NULL,"
                " expires_at REAL NOT NULL)"
            ),
        )

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return sqlite3.Error

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():  # none, or the parent's
            make_private(self.path)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0)
            # Two workers may open a new database at once: switching it to WAL needs the lock.
            write_retrying(self._write_lock, lambda: conn.execute("PRAGMA journal_mode=WAL").fetchall())
            # The file is the event store's: its durability setting, whatever a counter is worth.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints: see store.Checkpointer
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
        try:
            self._connection().execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return True

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


def _refusal(item: RateLimitItem, reset_at: float) -> RateLimited:
    return RateLimited(str(item), max(1, math.ceil(reset_at - time.time())))


class Hit:
    """One request's count against its source's limits, for the client's address.

    It is written either at once (`count`: Redis, or a request refused before its event is
    stored) or inside the accepted event's own transaction (`count_in`: SQLite counters,
    which live in the event store's file), so an accepted event costs one write, not two.
    """

    def __init__(self, limits: RateLimits, items: list[RateLimitItem], identifiers: tuple[str, str]) -> None:
        self.limits = limits
        self.items = items
        self.identifiers = identifiers
        self.counted = False

    def count(self) -> None:
        """Count the request now; raise `RateLimited` when a window is over its limit."""
        if self.counted:
            return
        self.counted = True
        strategy = self.limits.strategy
        for item in self.items:
            if not strategy.hit(item, *self.identifiers):
                raise _refusal(item, strategy.get_window_stats(item, *self.identifiers).reset_time)

    def count_quietly(self) -> None:
        """Count a request that is being refused anyway (401, 400, ...): nothing is raised."""
        try:
            self.count()
        except Exception:  # over the limit, or a broken counter store: the refusal stands
            log.debug("could not count a refused request", exc_info=True)

    def count_in(self, conn: sqlite3.Connection) -> None:
        """Count the request in the transaction that stores its event (SQLite counters only).

        A counter that cannot be written lets the event through, as in `RateLimits.check`.
        """
        if self.counted:
            return
        self.counted = True
        for item in self.items:
            try:
                count, reset_at = increment(conn, item.key_for(*self.identifiers), item.get_expiry())
            except sqlite3.Error:
                if not conn.in_transaction:  # the error ended the group's transaction: abort it
                    raise
                log.warning("rate limit counter not written; letting the event through", exc_info=True)
                return
            if count > item.amount:
                raise _refusal(item, reset_at)


class RateLimits:
    """RATE_LIMIT (or a source's own limit) per source and client address, checked by the view.

    The webhook view calls `check` once per request, after the 404/405/403 checks, with the
    source it has already resolved. flask-limiter's before_request hook did the same job by
    resolving default and decorated limits for every request: it cost about 165 us a request
    here even with no limit configured (a sixth of the receiver's CPU), so we use its engine,
    `limits`, directly: the same syntax, storages and fixed-window counting.
    """

    def __init__(self, storage: Storage, default: str) -> None:
        self.storage = storage
        self.strategy = FixedWindowRateLimiter(storage)
        self.default = default
        # SQLite counters share the event store's file: an accepted event is counted in its
        # own transaction, and `check` only reads.
        self.counted_with_event = isinstance(storage, SQLiteStorage)
        self._parsed: dict[str, list[RateLimitItem]] = {}

    def items(self, limit: str) -> list[RateLimitItem]:
        """The limit string parsed once, smallest window first (as flask-limiter orders them)."""
        items = self._parsed.get(limit)
        if items is None:
            items = self._parsed[limit] = sorted(parse_many(limit))
        return items

    def check(self, source: Source, client: str) -> Hit:
        """Refuse with `RateLimited` when a window is full; else the request's pending `Hit`.

        A broken store (Redis down, a locked file) lets the request through: a limiter
        failure must never stop an alarm from being accepted.
        """
        hit = Hit(self, self.items(source.rate_limit or self.default), (source.name, client))
        try:
            if not self.counted_with_event or any(not self.strategy.test(item, *hit.identifiers) for item in hit.items):
                hit.count()
        except RateLimited:
            raise
        except Exception:
            hit.counted = True  # not again, in the event's transaction
            log.warning("rate limit storage failed; letting the request through", exc_info=True)
        return hit


def init_app(app: Flask, uri: str, default: str) -> RateLimits:
    storage = storage_from_string(uri)
    if not isinstance(storage, Storage):  # an async (`async+...`) URI
        raise ValueError(f"not a synchronous rate-limit storage: {uri}")
    limits = RateLimits(storage, default)
    app.extensions[EXTENSION_KEY] = limits
    return limits


def get_rate_limits() -> RateLimits:
    limits: RateLimits = current_app.extensions[EXTENSION_KEY]
    return limits
