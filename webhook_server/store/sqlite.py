"""The durable embedded store: SQLite in WAL mode under DATA_DIR.

Events, deliveries, alert cool-downs and rate-limit counters live in one database, so accepting
an event and everything the worker later decides about it are transactions in one place. Each
thread gets its own connection (SQLite connections must not be shared across threads), and a
forked process opens fresh ones.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from webhook_server.store.base import EventStore
from webhook_server.store.group import Checkpointer, GroupWriter, begin_immediate, write_retrying
from webhook_server.store.schema import ADDED_COLUMNS, SCHEMA


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


def connect(path: Path, busy_timeout_ms: int, write_lock: threading.Lock) -> sqlite3.Connection:
    """A connection to the store's file with its settings; `write_lock` is the caller's own."""
    make_private(path)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000)
    conn.row_factory = sqlite3.Row
    # Two workers may open a new database at once: switching it to WAL needs the lock.
    write_retrying(write_lock, lambda: conn.execute("PRAGMA journal_mode=WAL").fetchall())
    # NORMAL in WAL mode survives a process crash (kill -9); only an OS crash or power loss
    # can drop the last transactions. FULL halved ingest throughput here.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")  # see group.Checkpointer
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    conn.execute("PRAGMA foreign_keys=ON")
    # The store's SQL says GREATEST, as PostgreSQL does; SQLite's two-argument MAX is the same.
    conn.create_function("greatest", 2, max, deterministic=True)
    return conn


def create_schema(conn: sqlite3.Connection, write_lock: threading.Lock) -> None:
    """The tables, and the columns added since an older database was made (one transaction,
    so two processes starting at once cannot both add a column)."""
    write_retrying(write_lock, lambda: conn.executescript(SCHEMA))
    write_retrying(write_lock, lambda: _add_columns(conn))


def _add_columns(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, column, declaration in ADDED_COLUMNS:
            present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class Store(EventStore):
    """Connections to one SQLite database, one per thread and process."""

    kind = "sqlite"

    def __init__(self, path: Path, busy_timeout_ms: int = 5000, checkpoint_after: int | None = 0) -> None:
        """`checkpoint_after`: commits between this process's WAL checkpoints (see Checkpointer);
        None: its writes never checkpoint."""
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self.checkpointer = Checkpointer(min_commits=checkpoint_after or 0)
        self.writer = GroupWriter(self.connection, self.checkpointer if checkpoint_after is not None else None)
        create_schema(self.connection(), self._write_lock)

    def connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():  # none, or the parent's
            conn = connect(self.path, self.busy_timeout_ms, self._write_lock)
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: BEGIN IMMEDIATE takes the write lock up front, so no deadlock."""
        conn = self.connection()
        begin_immediate(conn)  # another process's write: retried in short steps
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def newest_given(self) -> int:
        row = self.connection().execute("SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'events'")
        return int(row.fetchone()[0])

    def checkpoint(self, force: bool = False) -> None:
        """A PASSIVE WAL checkpoint: on the checkpointer's timer, or now (`force`: after a large delete)."""
        if not force:
            self.checkpointer.maybe(self.connection())
            return
        # PASSIVE never waits, and holds no write lock.
        with suppress(sqlite3.Error):
            self.connection().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
