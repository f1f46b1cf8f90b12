"""The live stream as a Flask extension: this process's hub, its doorbell, and how many may subscribe.

Under Gunicorn's gthread workers a stream holds a thread for its life, so each process takes at
most GUNICORN_THREADS - RESERVED_THREADS streams and answers 503 (with Retry-After) beyond that:
the threads left are the webhook POSTs', which subscribers must never starve.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from flask import Flask, current_app
from werkzeug.exceptions import ServiceUnavailable

from webhook_server.live.doorbell import Doorbell
from webhook_server.live.hub import Hub
from webhook_server.live.redis_bell import RedisBell
from webhook_server.settings import Settings
from webhook_server.store.base import EventStore
from webhook_server.store.extension import event_stored

EXTENSION_KEY = "webhook_live"
RESERVED_THREADS = 8


class TooManySubscribers(ServiceUnavailable):
    description = "This server takes no more live subscribers now; retry after Retry-After."

    def __init__(self, retry_after: int = 5) -> None:
        super().__init__(retry_after=retry_after)  # werkzeug sets the instance's own, None by default


@dataclass
class Live:
    hub: Hub
    doorbell: Doorbell
    capacity: int
    streams: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take_place(self) -> None:
        """One of this process's stream places, or 503; give it back with `leave`."""
        with self._lock:
            if self.streams >= self.capacity:
                raise TooManySubscribers()
            self.streams += 1

    def ring(self, store: EventStore, event_id: str) -> None:
        """After an event is stored: wake every hub on this host (none listen without subscribers),
        and with REDIS_URL every hub of every replica."""
        self.doorbell.ring(event_id)

    def leave(self) -> None:
        with self._lock:
            self.streams -= 1


class _Stopping:
    """Set by Gunicorn's SIGTERM (gunicorn_conf.post_worker_init): streams end within a second, so a
    stop does not wait out graceful_timeout for subscribers that never finish. No lock: it is set
    from a signal handler."""

    value = False


def stop_streams() -> None:
    _Stopping.value = True


def stopping() -> bool:
    return _Stopping.value


def init_app(app: Flask, settings: Settings, store: EventStore) -> Live | None:
    """The hub for this process, when SUBSCRIBER_TOKENS opens the stream to anyone. Either way each
    stored event rings the host's doorbell, which the delivery worker listens to as well."""
    # With REDIS_URL a ring reaches other hosts too: their hubs, and their delivery workers.
    doorbell = Doorbell(settings.data_dir / "live", RedisBell(settings.redis_url) if settings.redis_url else None)
    if not settings.subscriber_tokens:
        event_stored.connect(lambda sender, **_: doorbell.ring(), sender=store, weak=False)
        return None
    live = Live(Hub(store, doorbell), doorbell, max(settings.web_threads - RESERVED_THREADS, 1))
    app.extensions[EXTENSION_KEY] = live
    event_stored.connect(live.ring, sender=store, weak=False)
    return live


def get_live() -> Live | None:
    live: Live | None = current_app.extensions.get(EXTENSION_KEY)
    return live
