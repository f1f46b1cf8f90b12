"""The durable embedded store: SQLite in WAL mode under DATA_DIR.

Events, deliveries, alert cool-downs and rate-limit counters live in one database, so accepting
an event and everything the worker later decides about it are transactions in one place. Each
thread gets its own connection (SQLite connections must not be shared across threads), and a
forked process opens fresh ones.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from webhook_server.store.group import Checkpointer, GroupWriter, write_retrying
from webhook_server.store.records import Received, StoredEvent, event_from_row, utc_now_iso
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
    return conn


def answers(connection: Callable[[], sqlite3.Connection]) -> bool:
    """True when the database behind `connection` answers a read."""
    try:
        connection().execute("SELECT 1").fetchone()
    except sqlite3.Error:
        return False
    return True


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


def event_row(
    source: str,
    dedupe_key: str | None,
    event: str,
    device: str,
    client_ip: str | None,
    payload: Any,
    received: Received | None,
) -> tuple[Any, ...]:
    """The values of a new `events` row, in INSERT_EVENT's order."""
    raw = (received.body, received.content_type, json.dumps(received.headers)) if received else (None, None, None)
    payload_text = json.dumps(payload, ensure_ascii=False)
    return (source, dedupe_key, utc_now_iso(), event, device, client_ip, payload_text, *raw)


INSERT_EVENT = (
    "INSERT INTO events (source, dedupe_key, received_at, event, device, client_ip, payload, body,"
    " content_type, headers) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id"
)


def insert_or_find(conn: sqlite3.Connection, row: tuple[Any, ...]) -> tuple[str, bool]:
    """(id, True) for a new event, or (the first one's id, False) when its dedupe key is known."""
    inserted = conn.execute(INSERT_EVENT, row).fetchall()
    if inserted:
        return str(inserted[0][0]), True
    existing = conn.execute("SELECT id FROM events WHERE source = ? AND dedupe_key = ?", (row[0], row[1])).fetchone()
    return str(existing[0]), False


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
        create_schema(self.connection(), self._write_lock)

    def connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():  # none, or the parent's
            conn = connect(self.path, self.busy_timeout_ms, self._write_lock)
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
        received: Received | None = None,
        after: Callable[[sqlite3.Connection, str, bool], None] | None = None,
    ) -> tuple[str, bool]:
        """Store an event durably; return (id, created). A known dedupe key returns the first id.

        `before` runs first in the same transaction (the rate-limit count); what it raises
        is raised here, and the event is not stored. `after(conn, id, created)` runs last in
        it (the audit record). `received` (the raw request) is kept in the same row, so it
        costs no second write.
        """
        row = event_row(source, dedupe_key, event, device, client_ip, payload, received)

        def insert(conn: sqlite3.Connection) -> tuple[str, bool]:
            if before is not None:
                before(conn)
            event_id, created = insert_or_find(conn, row)
            if after is not None:
                after(conn, event_id, created)
            return event_id, created

        # Committed (with whatever other threads of this process wrote meanwhile) on return.
        return self.writer.run(insert)

    def newest_id(self) -> int:
        """The id of the newest event stored (0 for none)."""
        row = self.connection().execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()
        return int(row[0])

    def id_bounds(self) -> tuple[int, int]:
        """(the oldest id still kept, the newest id ever given); the oldest is newest + 1 when none is kept."""
        row = (
            self.connection()
            .execute(
                "SELECT (SELECT MIN(id) FROM events),"
                " (SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'events')"
            )
            .fetchone()
        )
        newest = int(row[1])
        return (int(row[0]) if row[0] is not None else newest + 1), newest

    def events_after(self, after: int, limit: int, sources: frozenset[str] | None = None) -> list[StoredEvent]:
        """Up to `limit` events with an id after `after`, in id order (only of `sources`, if given)."""
        if sources is None:
            rows = (
                self.connection()
                .execute("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (after, limit))
                .fetchall()
            )
        else:
            marks = ",".join("?" * len(sources))
            rows = (
                self.connection()
                .execute(
                    f"SELECT * FROM events WHERE id > ? AND source IN ({marks}) ORDER BY id LIMIT ?",  # noqa: S608
                    (after, *sorted(sources), limit),
                )
                .fetchall()
            )
        return [event_from_row(row) for row in rows]

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
        return answers(self.connection)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
