"""Rate limits per source and client address, with `limits` (the engine under flask-limiter).

Counts must be shared by every Gunicorn worker (flask-limiter's `memory://` keeps one count
per process, so two workers let twice the limit through). Without Redis the counters live in
a table of the event store (SQLite or PostgreSQL); with REDIS_URL they live in Redis.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import suppress

from flask import Flask, current_app
from limits import RateLimitItem, parse_many
from limits.storage import Storage, storage_from_string
from limits.strategies import FixedWindowRateLimiter

from webhook_server.errors import RateLimited
from webhook_server.ingest.sources import Source
from webhook_server.store.base import STORE_ERRORS, Connection, EventStore
from webhook_server.store.counters import StoreCounters, increment

log = logging.getLogger(__name__)

EXTENSION_KEY = "webhook_limiter"
FAILURE_LOG_SECONDS = 60.0


def _refusal(item: RateLimitItem, reset_at: float) -> RateLimited:
    return RateLimited(str(item), max(1, math.ceil(reset_at - time.time())))


class Hit:
    """One request's count against its source's limits, for the client's address.

    It is written either at once (`count`: Redis, or a request refused before its event is
    stored) or inside the accepted event's own transaction (`count_in`: store counters,
    which live in the event store's database), so an accepted event costs one write, not two.
    """

    def __init__(self, limits: RateLimits, items: list[RateLimitItem], identifiers: tuple[str, str]) -> None:
        self.limits = limits
        self.items = items
        self.identifiers = identifiers
        self.counted = False
        self.counted_in: Connection | None = None  # the transaction `count_in` counted in

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

    def refused_counter(self) -> Callable[[Connection], None] | None:
        """Count a refused request (401, 400, ...): now (Redis), or the returned function counts
        it in the transaction of its audit record (store counters, in the store's database)."""
        if not self.limits.counted_with_event:
            self.count_quietly()
            return None

        def count(conn: Connection) -> None:
            with suppress(RateLimited):  # over the limit: the refusal stands as it is
                self.count_in(conn)

        return count

    def count_in(self, conn: Connection) -> None:
        """Count the request in the transaction that stores its event (store counters only).

        A counter that cannot be written lets the event through, as in `RateLimits.check`. Run
        again on another connection, it counts again: store.postgres' PgGroupWriter writes a group
        again (on a new connection object) after rolling back the attempt that counted.
        """
        if self.counted and self.counted_in in (None, conn):  # by `check`, or in this transaction
            return
        self.counted, self.counted_in = True, conn
        for item in self.items:
            try:
                count, reset_at = increment(conn, item.key_for(*self.identifiers), item.get_expiry())
            except STORE_ERRORS:
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
        # Store counters share the event store's database: an accepted event is counted in its
        # own transaction, and `check` only reads.
        self.counted_with_event = isinstance(storage, StoreCounters)
        self._parsed: dict[str, list[RateLimitItem]] = {}
        self._quiet_until = 0.0

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
            if self.counted_with_event:
                self._refuse_when_full(hit)
            else:
                hit.count()
        except RateLimited:
            raise
        except Exception as exc:
            hit.counted = True  # not again, in the event's transaction
            self._said_failing(exc)
        return hit

    def _said_failing(self, exc: Exception) -> None:
        """Say that the counters failed at most once a minute (per process): an outage of Redis
        or of the store would otherwise write a traceback for every request."""
        now = time.monotonic()
        if now < self._quiet_until:
            return
        self._quiet_until = now + FAILURE_LOG_SECONDS
        log.warning("rate limit storage failed (%s: %s); letting requests through", type(exc).__name__, exc)

    def _refuse_when_full(self, hit: Hit) -> None:
        """Only read (store counters): an accepted request is counted with its event, and one
        over a full window needs no count (a fixed window only grows), so a flood of 429s
        writes nothing but its folded audit record."""
        for item in hit.items:
            if not self.strategy.test(item, *hit.identifiers):
                hit.counted = True
                raise _refusal(item, self.strategy.get_window_stats(item, *hit.identifiers).reset_time)


def init_app(app: Flask, store: EventStore, redis_url: str | None, default: str) -> RateLimits:
    """Counters in Redis when REDIS_URL is set, else in the event store's own database."""
    storage = storage_from_string(redis_url) if redis_url else StoreCounters(store)
    if not isinstance(storage, Storage):  # an async (`async+...`) URI
        raise ValueError("REDIS_URL is not a synchronous rate-limit storage")
    limits = RateLimits(storage, default)
    app.extensions[EXTENSION_KEY] = limits
    return limits


def get_rate_limits() -> RateLimits:
    limits: RateLimits = current_app.extensions[EXTENSION_KEY]
    return limits
