"""One subscription, whatever the transport: the stored events after a cursor, then the live tail.

`follow` yields what a transport sends, in order: `Reset` when the cursor is older than what is
still kept (or newer than anything accepted: the store was replaced), every `StoredEvent` after
it in id order, `Live` once the backlog is sent, `Heartbeat` when idle, and `Overflow` last when
the subscriber fell too far behind. The seam between backlog and tail has no gap and no repeat:
the subscriber is registered before the backlog is read, so what commits meanwhile reaches its
buffer, and anything at or before the last id sent is dropped.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from webhook_server.live.hub import BATCH, Hub, Subscriber
from webhook_server.store.base import EventStore
from webhook_server.store.records import StoredEvent

HEARTBEAT_SECONDS = 15.0  # the contract: at least every 25 s
WAKE_SECONDS = 1.0  # how often a waiting stream looks at `stopping`


@dataclass(frozen=True)
class Reset:
    oldest: int  # the oldest id still kept; the stream goes on from there


@dataclass(frozen=True)
class Live:
    """The backlog is sent; what follows is new."""


@dataclass(frozen=True)
class Heartbeat:
    pass


@dataclass(frozen=True)
class Overflow:
    reason: str


Item = StoredEvent | Reset | Live | Heartbeat | Overflow


def starting_point(store: EventStore, since: int | None, start: int) -> tuple[int, Reset | None]:
    """The cursor to read after, and the reset to send first, if any."""
    if since is None:
        return start, None  # no cursor: only what is new
    oldest, newest = store.id_bounds()
    if since < oldest - 1 or since > newest:
        return oldest - 1, Reset(oldest)
    return since, None


def backlog(store: EventStore, channels: frozenset[str], after: int) -> Iterator[StoredEvent]:
    """Every stored event of `channels` after `after`, in id order, a batch at a time."""
    while True:
        events = store.events_after(after, BATCH, channels)
        yield from events
        if len(events) < BATCH:
            return
        after = int(events[-1].id)


def follow(
    store: EventStore,
    hub: Hub,
    channels: frozenset[str],
    since: int | None,
    stopping: Callable[[], bool] = lambda: False,
) -> Iterator[Item]:
    """What one subscriber gets, until it overflows or `stopping()` (the worker shuts down)."""
    subscriber = hub.subscribe(channels)
    try:
        cursor, reset = starting_point(store, since, subscriber.start)
        if reset is not None:
            yield reset
        while True:  # the backlog again after an overflow while it was read
            for event in backlog(store, channels, cursor):
                cursor = int(event.id)
                yield event
            if not subscriber.overflowed:
                break
            subscriber.restart()
        yield Live()
        yield from tail(subscriber, cursor, stopping)
    finally:
        hub.unsubscribe(subscriber)


def tail(subscriber: Subscriber, cursor: int, stopping: Callable[[], bool]) -> Iterator[Item]:
    """The live events after `cursor`, heartbeats when idle, and an overflow to end with."""
    idle_since = time.monotonic()
    while not stopping():
        if subscriber.overflowed:
            yield Overflow(f"more than {subscriber.events.maxsize} events waiting for this subscriber")
            return
        try:
            event = subscriber.events.get(timeout=WAKE_SECONDS)
        except queue.Empty:
            if time.monotonic() - idle_since >= HEARTBEAT_SECONDS:
                idle_since = time.monotonic()
                yield Heartbeat()
            continue
        if int(event.id) > cursor:
            cursor = int(event.id)
            idle_since = time.monotonic()
            yield event
