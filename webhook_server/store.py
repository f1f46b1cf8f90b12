"""The durable embedded store: SQLite in WAL mode under DATA_DIR.

Events, deliveries and alert cool-downs live in one database, so accepting an event and
everything the worker later decides about it are transactions in one place. Each thread
gets its own connection (SQLite connections must not be shared across threads), and a
forked process opens fresh ones.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from flask import Flask, current_app

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    dedupe_key TEXT,
    received_at TEXT NOT NULL,
    event TEXT NOT NULL DEFAULT '',
    device TEXT NOT NULL DEFAULT '',
    client_ip TEXT,
    payload TEXT NOT NULL,
    dispatched INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS events_dedupe ON events(source, dedupe_key)
    WHERE dedupe_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_undispatched ON events(id) WHERE dispatched = 0;

CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id INTEGER NOT NULL REFERENCES events(id),
    kind TEXT NOT NULL,
    channel TEXT NOT NULL,
    recipient TEXT NOT NULL,
    repeats INTEGER NOT NULL DEFAULT 0,
    window_start REAL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at REAL NOT NULL,
    sent_at REAL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(next_attempt_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries(id) WHERE status = 'dead';

-- Rate-limit windows (ratelimit.SQLiteStorage), here so that an accepted event is counted in
-- the transaction that stores it.
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    expires_at REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS cooldowns (
    source TEXT NOT NULL,
    event TEXT NOT NULL,
    device TEXT NOT NULL,
    opened_at REAL NOT NULL,
    closes_at REAL NOT NULL,
    first_event_id INTEGER NOT NULL,
    last_event_id INTEGER NOT NULL,
    repeats INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (source, event, device)
);
"""

EXTENSION_KEY = "webhook_store"
T = TypeVar("T")
WRITE_PATIENCE_SECONDS = 5.0


def make_private_dir(path: Path) -> None:
    """Create `path` (and missing parents) readable by this user only; an existing one is left."""
    for directory in reversed([path, *path.parents]):
        if not directory.exists():
            directory.mkdir(mode=0o700, exist_ok=True)


def make_private(path: Path) -> None:
    """Create the database's directory (0700) and file (0600) when missing: they hold every
    payload. SQLite gives its -wal and -shm files the database file's mode."""
    make_private_dir(path.parent)
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _locked(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def _retry_locked(operation: Callable[[], T], lock: threading.Lock | None = None) -> T:
    """Run `operation` (under `lock`, if given) until the database is not locked by another
    process, with short doubling pauses (50 us to 1 ms), for up to WRITE_PATIENCE_SECONDS."""
    pause, deadline = 0.00005, time.monotonic() + WRITE_PATIENCE_SECONDS
    while True:
        try:
            if lock is None:
                return operation()
            with lock:
                return operation()
        except sqlite3.OperationalError as exc:
            if not _locked(exc) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.001)


def write_retrying(lock: threading.Lock, operation: Callable[[], T]) -> T:
    """Run a short write, one thread of this process at a time, retrying a locked database.

    Threads of one process queue on `lock` instead of in SQLite's busy handler, which
    sleeps in steps of up to 100 ms while the lock is held for a tenth of a millisecond.
    Measured under 32 connections: p99 fell from about 200 ms to under 60 ms.
    """
    return _retry_locked(operation, lock)


def begin_immediate(conn: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE, waiting for other processes' writes (see `_retry_locked`)."""
    _retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))


CHECKPOINT_SECONDS = 0.5
# About SQLite's own 1,000-page threshold: a few pages per commit, several events per commit.
WEB_CHECKPOINT_COMMITS = 1000


class Checkpointer:
    """A PASSIVE WAL checkpoint at most every `interval` seconds, and after `min_commits`.

    SQLite's automatic checkpoint runs in whichever connection commits once the WAL passes
    1,000 pages. With several processes and threads there is nearly always a reader on the
    old frames, so the WAL cannot restart, stays over the threshold, and every commit tried a
    checkpoint (two fsyncs each): half the CPU of an insert here. Connections turn that off
    (`wal_autocheckpoint=0`) and call `maybe` after they commit instead.

    The delivery worker checkpoints on its timer (`min_commits=0`), off the request path. The
    web processes also checkpoint after every `min_commits` commits, so the WAL stays bounded
    when no worker runs; that checkpoint delays the one request that leads the group. On a
    0.5 s timer in the web processes, a checkpoint's fsync landed on nearly every request at
    Particle's pace. Only connections with synchronous=NORMAL or FULL may checkpoint: one with
    OFF would copy frames into the database file without an fsync.
    """

    def __init__(self, interval: float = CHECKPOINT_SECONDS, min_commits: int = 0) -> None:
        self.interval = interval
        self.min_commits = min_commits
        self._commits = 0
        self._due = 0.0
        self._lock = threading.Lock()

    def maybe(self, conn: sqlite3.Connection) -> None:
        self._commits += 1  # not exact across threads; it only paces the fallback
        now = time.monotonic()
        if self._commits < self.min_commits or now < self._due or not self._lock.acquire(blocking=False):
            return
        try:
            self._due = now + self.interval
            self._commits = 0
            # PASSIVE never waits: busy (another process checkpointing) just means later.
            with suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            self._lock.release()


class GroupAborted(sqlite3.OperationalError):
    """The group's transaction ended before its COMMIT: nothing of it was stored."""


class _Write:
    __slots__ = ("error", "lead", "operation", "result", "wake")

    def __init__(self, operation: Callable[[sqlite3.Connection], Any]) -> None:
        self.operation = operation
        self.lead = False
        self.result: Any = None
        self.error: Exception | None = None
        self.wake = threading.Lock()
        self.wake.acquire()  # released by the leader that wrote it, or that hands over the lead


class GroupWriter:
    """Short writes from the threads of one process, committed together (group commit).

    A thread that finds no group being written leads: it takes every write queued so far,
    runs them in one BEGIN IMMEDIATE ... COMMIT, wakes each of their threads with its result,
    and hands the lead to the first write queued meanwhile. Each write still returns only
    after its transaction has committed. Under 32 connections one transaction per request
    made the web processes queue for SQLite's single write lock (and sleep-retry against each
    other); a group takes that lock once and writes the shared pages once. Each waiting thread
    is woken exactly once (a context switch costs more than the write in this VM).

    An operation's error goes to its own caller and spoils no other write: SQLite undoes the
    failing statement, and what the operation executed before it stays in the transaction
    (the count of a request refused by its rate limit is meant to). An error that ends the
    whole transaction (an I/O error) fails every write of the group, none of them stored.
    """

    def __init__(self, connection: Callable[[], sqlite3.Connection], checkpointer: Checkpointer | None) -> None:
        self._connection = connection
        self._checkpointer = checkpointer
        self._mutex = threading.Lock()
        self._queue: list[_Write] = []
        self._leading = False

    def run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        item = _Write(operation)
        with self._mutex:
            if self._leading:
                self._queue.append(item)
            else:
                self._leading = item.lead = True
        if not item.lead:
            item.wake.acquire()
        if item.lead:
            self._lead(item)
        if item.error is not None:
            raise item.error
        result: T = item.result
        return result

    def _lead(self, item: _Write) -> None:
        with self._mutex:
            batch, self._queue = [item, *self._queue], []
        try:
            self._commit(batch)
        finally:
            with self._mutex:
                following = self._queue.pop(0) if self._queue else None
                if following is None:
                    self._leading = False
            for other in batch[1:]:
                other.wake.release()
            if following is not None:
                following.lead = True
                following.wake.release()
        if self._checkpointer is not None:
            self._checkpointer.maybe(self._connection())

    def _commit(self, batch: list[_Write]) -> None:
        try:
            conn = self._connection()
            begin_immediate(conn)
            try:
                for item in batch:
                    try:
                        item.result = item.operation(conn)
                    except Exception as exc:
                        item.error = exc
                        if not conn.in_transaction:  # SQLite rolled the whole group back
                            raise GroupAborted(f"the group's transaction ended: {exc}") from exc
                conn.execute("COMMIT")
            except BaseException:
                with suppress(sqlite3.Error):  # a failed COMMIT may have ended it already
                    conn.execute("ROLLBACK")
                raise
        except Exception as exc:
            for item in batch:  # nothing of the group is stored, whatever each one returned
                item.error = exc
        except BaseException:
            interrupted = GroupAborted("the group's transaction was interrupted")
            for item in batch:
                item.error = interrupted
            raise


@dataclass(frozen=True)
class StoredEvent:
    """An accepted event as subscribers, notifiers and forwarding targets see it."""

    id: str
    source: str
    received_at: str
    event: str
    device: str
    payload: Any
    client_ip: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "received_at": self.received_at,
            "event": self.event or None,
            "device": self.device or None,
            "payload": self.payload,
        }


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Store:
    """Connections to one SQLite database, one per thread and process."""

    def __init__(self, path: Path, busy_timeout_ms: int = 5000, checkpoint_after: int = 0) -> None:
        """`checkpoint_after`: commits between this process's WAL checkpoints (see Checkpointer)."""
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self.checkpointer = Checkpointer(min_commits=checkpoint_after)
        self.writer = GroupWriter(self.connection, self.checkpointer)
        make_private(self.path)
        conn = self.connection()
        write_retrying(self._write_lock, lambda: conn.executescript(SCHEMA))

    def connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,
                check_same_thread=False,
                timeout=self.busy_timeout_ms / 1000,
            )
            conn.row_factory = sqlite3.Row
            # Two workers may open a new database at once: switching it to WAL needs the lock.
            write_retrying(self._write_lock, lambda: conn.execute("PRAGMA journal_mode=WAL").fetchall())
            # NORMAL in WAL mode survives a process crash (kill -9); only an OS crash or
            # power loss can drop the last transactions. FULL halved ingest throughput here.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint=0")  # see Checkpointer
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    @contextmanager
    def transaction(self, immediate: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction: BEGIN IMMEDIATE takes the write lock up front, so no deadlock."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def insert_event(
        self,
        source: str,
        dedupe_key: str | None,
        event: str,
        device: str,
        client_ip: str | None,
        payload: Any,
        before: Callable[[sqlite3.Connection], None] | None = None,
    ) -> tuple[str, bool]:
        """Store an event durably; return (id, created). A known dedupe key returns the first id.

        `before` runs first in the same transaction (the rate-limit count); what it raises
        is raised here, and the event is not stored.
        """
        row = (source, dedupe_key, utc_now_iso(), event, device, client_ip, json.dumps(payload, ensure_ascii=False))

        def insert(conn: sqlite3.Connection) -> tuple[str, bool]:
            if before is not None:
                before(conn)
            inserted = conn.execute(
                "INSERT INTO events (source, dedupe_key, received_at, event, device, client_ip, payload)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                row,
            ).fetchall()
            if inserted:
                return str(inserted[0][0]), True
            existing = conn.execute(
                "SELECT id FROM events WHERE source = ? AND dedupe_key = ?", (source, dedupe_key)
            ).fetchone()
            return str(existing[0]), False

        # Committed (with whatever other threads of this process wrote meanwhile) on return.
        return self.writer.run(insert)

    def get_event(self, event_id: int | str) -> StoredEvent | None:
        row = self.connection().execute("SELECT * FROM events WHERE id = ?", (int(event_id),)).fetchone()
        return event_from_row(row) if row else None

    def counts(self) -> dict[str, int]:
        """Events accepted so far, deliveries waiting, and dead letters."""
        row = (
            self.connection()
            .execute(
                "SELECT (SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'events'),"
                " (SELECT COUNT(*) FROM deliveries WHERE status = 'pending'),"
                " (SELECT COUNT(*) FROM deliveries WHERE status = 'dead')"
            )
            .fetchone()
        )
        return {"events_accepted": row[0], "deliveries_pending": row[1], "dead_letters": row[2]}

    def ping(self) -> bool:
        """True when the database answers a read."""
        try:
            self.connection().execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return True

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def event_from_row(row: sqlite3.Row) -> StoredEvent:
    return StoredEvent(
        id=str(row["id"]),
        source=row["source"],
        received_at=row["received_at"],
        event=row["event"],
        device=row["device"],
        payload=json.loads(row["payload"]),
        client_ip=row["client_ip"],
    )


def init_app(app: Flask, path: Path) -> Store:
    # The web side retries locked writes itself (write_retrying), so SQLite must not sleep;
    # the delivery worker checkpoints the WAL, the web processes only when it seems not to run.
    store = Store(path, busy_timeout_ms=0, checkpoint_after=WEB_CHECKPOINT_COMMITS)
    app.extensions[EXTENSION_KEY] = store
    return store


def get_store() -> Store:
    store: Store = current_app.extensions[EXTENSION_KEY]
    return store
