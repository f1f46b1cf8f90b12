"""One hub per process: it tails the store's events and hands each to the subscribers of its channel.

Every subscriber gets every event of its channels, in id order, whichever Gunicorn worker stored
it (fan-out, not competing consumers). The hub's thread wakes on the doorbell (or once a second),
reads the events after the last one it saw, and offers each to every subscriber whose channels
include the event's source. A subscriber's buffer is bounded: when it is full the subscriber is
marked overflowed and gets nothing more; its stream then ends with the reason, and the client
resumes from its last id, out of the store.

In SQLite the writes are serialized and an event's id is taken inside its transaction, so ids
commit in order: reading `id > last` can never skip an event that commits later with a smaller id.
PostgreSQL gives ids under a lock that each group commit holds until it ends (store.postgres),
with the same effect across replicas.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from contextlib import suppress

from webhook_server.live.doorbell import Doorbell
from webhook_server.store.base import STORE_ERRORS, EventStore
from webhook_server.store.records import StoredEvent

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # a lost doorbell costs at most this much
BATCH = 500
BUFFER = 1000  # events waiting for one subscriber before it counts as too slow


class Subscriber:
    """One stream's share of the hub: the channels it takes and the events waiting for it."""

    def __init__(self, channels: frozenset[str], start: int, buffer: int = BUFFER) -> None:
        self.channels = channels
        self.start = start  # events after this id reach `events`; those before come from the store
        self.events: queue.Queue[StoredEvent] = queue.Queue(maxsize=buffer)
        self.overflowed = False

    def offer(self, event: StoredEvent) -> None:
        if self.overflowed or event.source not in self.channels:
            return
        try:
            self.events.put_nowait(event)
        except queue.Full:
            self.overflowed = True

    def restart(self) -> None:
        """Forget what is waiting (it will be read from the store) and take events again."""
        with suppress(queue.Empty):
            while True:
                self.events.get_nowait()
        self.overflowed = False


class Hub:
    """This process's tail of the events table, and its subscribers."""

    def __init__(self, store: EventStore, doorbell: Doorbell) -> None:
        self.store = store
        self.doorbell = doorbell
        self._lock = threading.Lock()
        self._subscribers: set[Subscriber] = set()
        self._by_channel: dict[str, set[Subscriber]] = {}  # each event goes only to its channel's
        self._last = 0
        self._thread: threading.Thread | None = None

    def subscribe(self, channels: frozenset[str], buffer: int = BUFFER) -> Subscriber:
        """A new subscriber; what is stored after `subscriber.start` reaches it."""
        with self._lock:
            if not self._subscribers:  # nobody listened: start from now, not from the last one's end
                self._last = self.store.newest_id()
            subscriber = Subscriber(channels, self._last, buffer)
            self._subscribers.add(subscriber)
            for channel in channels:
                self._by_channel.setdefault(channel, set()).add(subscriber)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, args=(self.doorbell.listen(),), daemon=True)
                self._thread.name = "live-hub"
                self._thread.start()
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)
            for channel in subscriber.channels:
                self._by_channel.get(channel, set()).discard(subscriber)

    @property
    def count(self) -> int:
        return len(self._subscribers)

    def _run(self, receiver: socket.socket) -> None:
        while True:
            wait_for_ring(receiver)
            try:
                self.deliver_new()
            except STORE_ERRORS as exc:
                log.warning("live stream: the store did not answer (%s); trying again", exc)

    def deliver_new(self) -> int:
        """Offer every event stored since the last look to the subscribers; returns how many events."""
        with self._lock:
            if not self._subscribers:
                return 0
            last = self._last
        handed = 0
        while True:
            events = self.store.events_after(last, BATCH)
            if not events:
                return handed
            with self._lock:
                by_channel = {event.source: list(self._by_channel.get(event.source, ())) for event in events}
                self._last = last = int(events[-1].id)
            for event in events:
                for subscriber in by_channel[event.source]:
                    subscriber.offer(event)
            handed += len(events)


def wait_for_ring(receiver: socket.socket) -> None:
    """Until the doorbell rings or POLL_SECONDS pass; rings that came meanwhile count as one."""
    receiver.settimeout(POLL_SECONDS)
    with suppress(TimeoutError, OSError):
        receiver.recv(64)
        receiver.setblocking(False)
        with suppress(BlockingIOError):
            while receiver.recv(64):
                pass
