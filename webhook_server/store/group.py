"""Writing to SQLite from many threads and a few processes: retries, group commit, checkpoints.

Measured in docs/benchmarks.md: SQLite's own busy handler, a transaction per request and the
automatic WAL checkpoint each cost the web processes more than the insert itself.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

T = TypeVar("T")
WRITE_PATIENCE_SECONDS = 5.0


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

    def __init__(self, operation: Callable[[Any], Any]) -> None:
        self.operation = operation
        self.lead = False
        self.result: Any = None
        self.error: Exception | None = None
        self.wake = threading.Lock()
        self.wake.acquire()  # released by the leader that wrote it, or that hands over the lead


@contextmanager
def all_or_nothing(batch: list[_Write]) -> Iterator[None]:
    """An error that escapes the block fails every write of the group: none of it is stored,
    whatever each one returned."""
    try:
        yield
    except Exception as exc:
        for item in batch:
            item.error = exc
    except BaseException:
        interrupted = GroupAborted("the group's transaction was interrupted")
        for item in batch:
            item.error = interrupted
        raise


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

    def run(self, operation: Callable[[Any], T]) -> T:
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
        with all_or_nothing(batch):
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
