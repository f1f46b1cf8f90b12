"""The store in PostgreSQL (DATABASE_URL), for web replicas and workers on several hosts.

The rest of the program speaks the SQL of store.base (`?` marks, rows by name or position);
`PgConnection` hands it to psycopg 3, whose `%s` marks it becomes. A process keeps one pool of
connections (psycopg_pool), opened on first use after a fork and sized by its role.

Two things SQLite gave for free need saying here:
- Event ids in commit order. The live stream reads `id > cursor`; with two replicas inserting at
  once, id 7 could commit before id 6 and a stream past 7 would never see 6. Each group commit
  (PgGroupWriter: every event, audit record and count of the way in) therefore takes a
  transaction-level advisory lock first, and its events get their ids under it: ids are handed out
  and committed one transaction at a time, as SQLite's single writer did. Each process still
  commits its threads' writes together, so the lock is taken once per group, not per request.
- Schema changes. The tables come from `schema.POSTGRES_MIGRATIONS`, applied in order under an
  advisory lock, recorded in `schema_version`: two processes starting at once do not race.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import lru_cache
from typing import Any

import psycopg
from psycopg import pq
from psycopg_pool import ConnectionPool, PoolTimeout

from webhook_server.store.base import Connection, EventStore
from webhook_server.store.group import GroupWriter, _Write, all_or_nothing
from webhook_server.store.schema import POSTGRES_MIGRATIONS

log = logging.getLogger(__name__)
# psycopg_pool warns at each failed reconnection, several times a second while the database is
# away; the store says it once (`checked_out`).
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

# pg_advisory_xact_lock keys: any two numbers no other program on the database uses.
EVENT_ORDER_LOCK = 0x5745_4231  # "WEB1"
MIGRATION_LOCK = 0x5745_4232
NAMED_LOCKS = 0x5745_4233  # with hashtext(name): `take_turn`
POOL_WAIT_SECONDS = 3  # for a free connection, or a new one: then the web answers 503
RECONNECT_SECONDS = 5.0
IDLE_CHECK_SECONDS = 2.0  # a connection idle longer is checked before use (the server may have restarted)
BREAKER_SECONDS = 1.0  # after a checkout waited POOL_WAIT_SECONDS in vain, others fail at once


@lru_cache(maxsize=512)
def to_postgres(sql: str) -> str:
    """The store's SQL with psycopg's marks: `?` becomes `%s`, a literal `%` is doubled."""
    return sql.replace("%", "%%").replace("?", "%s")


class PgRow(tuple[Any, ...]):
    """A row readable by column name or position, as sqlite3.Row."""

    names: dict[str, int]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            key = self.names[key]
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self.names)


def pg_rows(cursor: Any) -> Callable[[Sequence[Any]], PgRow]:
    """psycopg row factory making PgRows: one row class per result's columns."""
    names = {column.name: index for index, column in enumerate(cursor.description or ())}
    row_class = type("Row", (PgRow,), {"names": names})
    return lambda values: row_class(values)


# Every connection: bounded waits, so a replica that hangs mid-transaction (a paused VM) holds
# the others for seconds, not for ever, and a dead peer is noticed by TCP keepalives.
CONNECTION_SETTINGS: dict[str, Any] = {
    "autocommit": True,
    "row_factory": pg_rows,
    "connect_timeout": 5,
    "options": "-c lock_timeout=5s -c statement_timeout=30s -c idle_in_transaction_session_timeout=60s",
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def mark_used(raw: psycopg.Connection[Any]) -> None:
    """Called by the pool as a connection comes back: when it was last used."""
    raw._webhook_used_at = time.monotonic()  # type: ignore[attr-defined]


def answers_after_idle(raw: psycopg.Connection[Any]) -> bool:
    """False for a connection that sat idle and no longer answers (the server restarted since).
    One that was used a moment ago is not asked: the way in pays nothing for this under load."""
    if time.monotonic() - getattr(raw, "_webhook_used_at", 0.0) <= IDLE_CHECK_SECONDS:
        return True
    try:
        raw.execute("")
    except psycopg.OperationalError:
        return False
    return True


class StoreAway(psycopg.OperationalError):
    """Raised at once, without asking the database, while it did not answer a moment ago."""


class _ServerRestarted(Exception):
    pass


Checkout = Callable[[], AbstractContextManager[psycopg.Connection[Any]]]


class PgConnection:
    """A psycopg connection that takes the store's SQL as sqlite3 does."""

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> psycopg.Cursor[Any]:
        return self.raw.execute(to_postgres(sql), parameters)

    def executemany(self, sql: str, parameters: Any, /) -> psycopg.Cursor[Any]:
        cursor = self.raw.cursor()
        cursor.executemany(to_postgres(sql), list(parameters))
        return cursor

    @property
    def in_transaction(self) -> bool:
        """False once an error has aborted the transaction (PostgreSQL then refuses all but ROLLBACK)."""
        return self.raw.info.transaction_status == pq.TransactionStatus.INTRANS


class Fetched:
    """What a statement outside a transaction gave, read whole before its connection went back."""

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Any]:
        return self.rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)


class PooledStatements:
    """`store.connection()` in PostgreSQL: each statement on a connection of the pool, autocommitted."""

    in_transaction = False

    def __init__(self, checkout: Checkout) -> None:
        self.checkout = checkout

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Fetched:
        with self.checkout() as raw:
            cursor = raw.execute(to_postgres(sql), parameters)
            return Fetched(cursor.fetchall() if cursor.description else [], cursor.rowcount)

    def executemany(self, sql: str, parameters: Any, /) -> Fetched:
        with self.checkout() as raw, raw.transaction():
            cursor = raw.cursor()
            cursor.executemany(to_postgres(sql), list(parameters))
            return Fetched([], cursor.rowcount)


class PgGroupWriter(GroupWriter):
    """GroupWriter's group commit on a pooled connection.

    PostgreSQL aborts the whole transaction when a statement fails. The write that failed gets its
    error, and the others are written again without it in a new transaction (a savepoint around
    every write cost two more round trips on each write of each group). An error that is not the
    database's (a rate-limit refusal) keeps what its write did; a lost connection fails the group.
    """

    def __init__(self, checkout: Checkout) -> None:
        super().__init__(lambda: None, None)  # type: ignore[arg-type, return-value]
        self._checkout = checkout

    def _commit(self, batch: list[_Write]) -> None:
        pending = list(batch)
        with all_or_nothing(batch):
            while pending and (failed := self._attempt(pending)) is not None:
                pending.remove(failed)

    def _attempt(self, batch: list[_Write]) -> _Write | None:
        """Run the writes in one transaction: None once it committed, or the write whose
        statement the database refused (nothing of this attempt is stored then)."""
        failed: _Write | None = None
        with self._checkout() as raw:
            try:
                with raw.transaction():
                    conn = PgConnection(raw)
                    # First, before any row is locked: a group that locked a counter row and then
                    # waited for this lock could deadlock with another replica's.
                    conn.execute("SELECT pg_advisory_xact_lock(?)", (EVENT_ORDER_LOCK,))
                    for item in batch:
                        item.error = None
                        try:
                            item.result = item.operation(conn)
                        except psycopg.Error as exc:
                            item.error, failed = exc, item
                            raise
                        except Exception as exc:
                            item.error = exc
            except psycopg.Error as exc:
                if failed is None or isinstance(exc, psycopg.OperationalError):
                    raise  # the COMMIT, or the connection: every write of the group fails
        return failed


def migrate(raw: psycopg.Connection[Any]) -> None:
    """Apply the migrations this database lacks, one process at a time."""
    with raw.transaction():
        # Not the connections' bounds: a migration may build an index for minutes, and the
        # other replicas starting meanwhile wait for it rather than give up after 5 s.
        raw.execute("SET LOCAL statement_timeout = 0")
        raw.execute("SET LOCAL lock_timeout = '15min'")
        raw.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        raw.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at TIMESTAMPTZ)")
        row = raw.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
        current = int(row[0]) if row else 0
        for version in range(current + 1, len(POSTGRES_MIGRATIONS) + 1):
            raw.execute(POSTGRES_MIGRATIONS[version - 1])
            raw.execute("INSERT INTO schema_version VALUES (%s, now())", (version,))
            log.info("store: PostgreSQL schema now at version %s", version)


class PostgresStore(EventStore):
    """The store in one PostgreSQL database, shared by every process on every host."""

    kind = "postgresql"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    look_first = True  # inside the group writer, which holds EVENT_ORDER_LOCK (see the module's docstring)

    def __init__(self, url: str, pool_size: int = 4) -> None:
        self.url = url
        self.pool_size = max(pool_size, 1)
        self._pool: ConnectionPool[Any] | None = None
        self._pid = 0
        self._migrated = False
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._away = False  # said so in the log; said again once it answers
        self.writer = PgGroupWriter(self.checked_out)
        try:
            self.pool()
        except psycopg.OperationalError as exc:
            # A replica may start while the database is away: it answers 503 until it is back.
            log.warning("store: PostgreSQL does not answer yet (%s); trying again on each use", exc)

    def pool(self) -> ConnectionPool[Any]:
        """This process's pool, its schema brought up to date on first use. A forked child opens
        its own (a pool's connections and threads do not survive a fork)."""
        pool = self._pool
        if pool is None or self._pid != os.getpid():
            pool = self._open_pool()
        if not self._migrated:
            with pool.connection() as raw:
                migrate(raw)
            self._migrated = True
        return pool

    def _open_pool(self) -> ConnectionPool[Any]:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = ConnectionPool(
                    self.url,
                    min_size=1,
                    max_size=self.pool_size,
                    kwargs=CONNECTION_SETTINGS,
                    timeout=POOL_WAIT_SECONDS,
                    # The pool retries a failed connection with a pause that doubles each time: an
                    # outage of a minute was followed by a minute of 503s. Given up after this
                    # long, the next request starts afresh.
                    reconnect_timeout=RECONNECT_SECONDS,
                    reset=mark_used,
                    name="webhook-store",
                    open=True,
                )
                self._pid = os.getpid()
            return self._pool

    @contextmanager
    def checked_out(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection of the pool, for one statement or one transaction.

        While the database is away every checkout would wait POOL_WAIT_SECONDS (a request's rate
        limit, its event and its audit record: three waits): for BREAKER_SECONDS after one
        such wait, checkouts fail at once. A connection found dead after sitting idle means the
        server restarted: every idle one is checked then, at once (psycopg_pool's own check
        paused longer after each dead one, and a pool of 20 took 18 s of 503s)."""
        if time.monotonic() < self._down_until:
            raise StoreAway("the store did not answer a moment ago")
        try:
            pool = self.pool()
            with pool.connection() as raw:
                self._answered()
                if not answers_after_idle(raw):
                    raise _ServerRestarted
                yield raw
        except _ServerRestarted:
            pool.check()
            with pool.connection() as raw:
                yield raw
        except PoolTimeout as exc:
            self._down_until = time.monotonic() + BREAKER_SECONDS
            if not self._away:
                self._away = True
                log.warning("store: PostgreSQL does not answer (%s); answering 503 until it does", exc)
            raise

    def _answered(self) -> None:
        if self._away:
            self._away = False
            log.warning("store: PostgreSQL answers again")

    def connection(self) -> PooledStatements:
        return PooledStatements(self.checked_out)

    @contextmanager
    def transaction(self) -> Iterator[PgConnection]:
        with self.checked_out() as raw, raw.transaction():
            yield PgConnection(raw)

    def checkpoint(self, force: bool = False) -> None:
        """Nothing: PostgreSQL checkpoints by itself."""

    def refused_statement(self, exc: Exception) -> bool:
        return isinstance(exc, psycopg.Error) and not isinstance(exc, psycopg.OperationalError)

    def take_turn(self, conn: Connection, name: str) -> bool:
        row = conn.execute("SELECT pg_try_advisory_xact_lock(?, hashtext(?))", (NAMED_LOCKS, name)).fetchone()
        return bool(row[0])

    def newest_given(self) -> int:
        row = self.connection().execute("SELECT last_value, is_called FROM events_id_seq").fetchone()
        return int(row[0]) if row[1] else 0

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.close()
        self._pool = None
