"""Rate limits per source and client address, with flask-limiter.

Counts must be shared by every Gunicorn worker (flask-limiter's `memory://` keeps one count
per process, so two workers let twice the limit through). Without Redis the counters live in
a small SQLite database beside the event store; with REDIS_URL they live in Redis.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

from flask import Blueprint, Flask, current_app, request
from flask_limiter import Limiter
from limits.storage import Storage

from .config import Settings
from .sources import Source
from .store import write_retrying

EXTENSION_KEY = "webhook_limiter"


class SQLiteStorage(Storage):
    """A fixed-window counter store for `limits`, shared by every process on the host.

    URI: ``sqlite:///absolute/path/limits.sqlite3``.
    """

    STORAGE_SCHEME = ["sqlite"]

    def __init__(self, uri: str, wrap_exceptions: bool = False, **options: float | str | bool) -> None:
        self.path = Path(unquote(urlparse(uri).path))
        self._local = threading.local()
        self._write_lock = threading.Lock()
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
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=0)
            # Two workers may open a new database at once: switching it to WAL needs the lock.
            write_retrying(self._write_lock, lambda: conn.execute("PRAGMA journal_mode=WAL").fetchall())
            # Counters are not precious: a lost increment on power loss is acceptable.
            conn.execute("PRAGMA synchronous=OFF")
            self._local.conn = conn
        return conn

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.time()
        conn = self._connection()
        row = write_retrying(
            self._write_lock,
            lambda: conn.execute(
                "INSERT INTO counters (key, count, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT(key) DO UPDATE SET"
                "  count = CASE WHEN expires_at <= ? THEN excluded.count ELSE count + excluded.count END,"
                "  expires_at = CASE WHEN expires_at <= ? THEN excluded.expires_at ELSE expires_at END"
                " RETURNING count",
                (key, amount, now + expiry, now, now),
            ).fetchall(),
        )
        return int(row[0][0])

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


def storage_uri(data_dir: Path, redis_url: str | None) -> str:
    if redis_url:
        return redis_url
    return f"sqlite:///{(data_dir / 'ratelimits.sqlite3').resolve()}"


def _source() -> Source | None:
    from .webhooks import enabled_source  # the view module owns the path-to-source rule

    name = (request.view_args or {}).get("name")
    return enabled_source(name) if isinstance(name, str) else None


def client_key() -> str:
    """Counts are kept per source and client address."""
    source = _source()
    return f"{source.name if source else '-'}|{request.remote_addr or '-'}"


def source_limit() -> str:
    """The source's own limit, else RATE_LIMIT."""
    source = _source()
    settings: Settings = current_app.config["SETTINGS"]
    return (source.rate_limit if source else None) or settings.rate_limit


def exempt() -> bool:
    """Requests that will be refused with 404, 405 or 403 anyway are not counted."""
    source = _source()
    return source is None or request.method != "POST" or not source.allows(request.remote_addr or "")


def init_app(app: Flask, uri: str, blueprint: Blueprint) -> Limiter:
    limiter = Limiter(
        key_func=client_key,
        app=app,
        storage_uri=uri,
        strategy="fixed-window",
        headers_enabled=False,
        default_limits=[],
        # A broken limiter store must not stop alarms from being accepted.
        swallow_errors=True,
        in_memory_fallback_enabled=False,
    )
    limiter.limit(source_limit, key_func=client_key, exempt_when=exempt, per_method=False)(blueprint)
    app.extensions[EXTENSION_KEY] = limiter
    return limiter
