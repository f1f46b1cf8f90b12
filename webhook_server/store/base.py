"""What every store offers, whichever database holds it: SQLite under DATA_DIR (store.sqlite) or
PostgreSQL at DATABASE_URL (store.postgres).

The SQL of the rest of the program is one vocabulary for both: `?` marks, ON CONFLICT upserts,
RETURNING, GREATEST for the larger of two values (SQLite gets it as a function of ours), and
rows read by name or by position. What differs (connections, transactions, the schema, the
newest id ever given) is each store's own.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import psycopg

from webhook_server.store.records import Received, StoredEvent, event_from_row, utc_now_iso

log = logging.getLogger(__name__)

# What a store raises when it cannot answer: the web side says 503, the worker tries again.
STORE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)


class Row(Protocol):
    """A result row: by column name or by position, as sqlite3.Row."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def keys(self) -> list[str]: ...


class Connection(Protocol):
    """The part of a connection the store's SQL needs (sqlite3.Connection has it)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, parameters: Any, /) -> Any: ...

    @property
    def in_transaction(self) -> bool: ...


class Writer(Protocol):
    def run(self, operation: Callable[[Any], Any]) -> Any: ...


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
FIND_EVENT = "SELECT id FROM events WHERE source = ? AND dedupe_key = ?"


class EventStore(ABC):
    """The events table's writes and reads, the same SQL on either database; connections,
    transactions and the newest id given are each store's own."""

    kind = "sqlite"  # what /health says
    writer: Writer
    # Appended to a claim's SELECT: workers on several hosts then take different rows.
    skip_locked = ""
    # Look for a redelivery's dedupe key before its INSERT: PostgreSQL's conflicting INSERT uses up
    # an id from the sequence (SQLite's does not), and under its event-order lock the look is exact.
    look_first = False

    @abstractmethod
    def connection(self) -> Connection:
        """For reads and single statements outside a transaction."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Connection]:
        """A write transaction; committed when the block ends, rolled back when it raises."""

    def insert_event(
        self,
        source: str,
        dedupe_key: str | None,
        event: str,
        device: str,
        client_ip: str | None,
        payload: Any,
        before: Callable[[Any], None] | None = None,
        received: Received | None = None,
        after: Callable[[Any, str, bool], None] | None = None,
    ) -> tuple[str, bool]:
        """Store an event durably; return (id, created). A known dedupe key returns the first id.

        `before` runs first in the same transaction (the rate-limit count); what it raises
        is raised here, and the event is not stored. `after(conn, id, created)` runs last in
        it (the audit record). `received` (the raw request) is kept in the same row, so it
        costs no second write.
        """
        row = event_row(source, dedupe_key, event, device, client_ip, payload, received)

        def insert(conn: Connection) -> tuple[str, bool]:
            if before is not None:
                before(conn)
            event_id, created = self.insert_or_find(conn, row)
            if after is not None:
                after(conn, event_id, created)
            return event_id, created

        # Committed (with whatever other threads of this process wrote meanwhile) on return.
        try:
            result: tuple[str, bool] = self.writer.run(insert)
        except STORE_ERRORS as exc:
            if (before is None and after is None) or not self.refused_statement(exc):
                raise
            # The count or the audit record was refused (PostgreSQL then refuses the whole
            # transaction): the event matters more than either.
            log.warning("event stored without its rate-limit count and audit record: %s", exc)
            result = self.writer.run(lambda conn: self.insert_or_find(conn, row))
        return result

    def refused_statement(self, exc: Exception) -> bool:
        """True when the database answered but refused a statement (not a lost connection). SQLite's
        hooks never raise such an error: SQLite undoes the failed statement and goes on."""
        return False

    def insert_or_find(self, conn: Connection, row: tuple[Any, ...]) -> tuple[str, bool]:
        """(id, True) for a new event, or (the first one's id, False) when its dedupe key is known.
        The unique index on (source, dedupe key) decides a race; the INSERT never conflicts else."""
        if self.look_first and row[1] is not None:
            found = conn.execute(FIND_EVENT, row[:2]).fetchone()
            if found is not None:
                return str(found[0]), False
        inserted = conn.execute(INSERT_EVENT, row).fetchall()
        if inserted:
            return str(inserted[0][0]), True
        return str(conn.execute(FIND_EVENT, row[:2]).fetchone()[0]), False

    @abstractmethod
    def newest_given(self) -> int:
        """The newest event id ever given, kept or not (0 for none)."""

    def take_turn(self, conn: Connection, name: str) -> bool:
        """Whether `conn`'s transaction may do the work called `name`, which one process at a time
        does (turning events into deliveries, a roll-up, retention): False while another
        process's transaction does it, which then does it for both. SQLite's BEGIN IMMEDIATE
        already makes each write transaction wait for the one before."""
        return True

    @abstractmethod
    def checkpoint(self, force: bool = False) -> None:
        """Whatever the database needs now and then from a long-running process (SQLite: its WAL)."""

    @abstractmethod
    def close(self) -> None:
        """Close this process's connections."""

    def newest_id(self) -> int:
        """The id of the newest event stored (0 for none)."""
        row = self.connection().execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()
        return int(row[0])

    def id_bounds(self) -> tuple[int, int]:
        """(the oldest id still kept, the newest id ever given); the oldest is newest + 1 when none is kept."""
        newest = self.newest_given()
        row = self.connection().execute("SELECT MIN(id) FROM events").fetchone()
        return (int(row[0]) if row[0] is not None else newest + 1), newest

    def events_after(self, after: int, limit: int, sources: frozenset[str] | None = None) -> list[StoredEvent]:
        """Up to `limit` events with an id after `after`, in id order (only of `sources`, if given)."""
        query = "SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?"
        params: list[Any] = [after, limit]
        if sources is not None:
            if not sources:
                return []
            marks = ",".join("?" * len(sources))
            query = f"SELECT * FROM events WHERE id > ? AND source IN ({marks}) ORDER BY id LIMIT ?"  # noqa: S608
            params = [after, *sorted(sources), limit]
        return [event_from_row(row) for row in self.connection().execute(query, params).fetchall()]

    def get_event(self, event_id: int | str) -> StoredEvent | None:
        row = self.connection().execute("SELECT * FROM events WHERE id = ?", (int(event_id),)).fetchone()
        return event_from_row(row) if row else None

    def counts(self) -> dict[str, int]:
        """Events accepted so far, deliveries waiting, and dead letters."""
        row = (
            self.connection()
            .execute(
                "SELECT (SELECT COUNT(*) FROM deliveries WHERE status = 'pending'),"
                " (SELECT COUNT(*) FROM deliveries WHERE status = 'dead')"
            )
            .fetchone()
        )
        return {"events_accepted": self.newest_given(), "deliveries_pending": int(row[0]), "dead_letters": int(row[1])}

    def ping(self) -> bool:
        """True when the database answers a read."""
        try:
            self.connection().execute("SELECT 1").fetchone()
        except STORE_ERRORS:
            return False
        return True
