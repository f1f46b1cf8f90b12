"""The doorbell across hosts (replicas): with REDIS_URL, a stored event is also PUBLISHed to Redis.

The process that stored an event publishes its id on CHANNEL; every process whose hub has
subscribers listens there (a daemon thread with its own connection) and rings its own local
doorbell on each message. Redis only wakes: the events, their order and resuming stay the
store's, and the hubs still look at the store once a second, so a lost message, or Redis being
down, costs at most that second.

Redis must never slow the way in down: a publish waits at most TIMEOUT_SECONDS, never retries,
and after a failure the process publishes nothing for QUIET_SECONDS. The listener reconnects
with a growing pause, and says once that Redis is lost and once that it is back.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

CHANNEL = "webhook-server:live"
TIMEOUT_SECONDS = 0.25  # connecting to Redis and each answer, for a publish
QUIET_SECONDS = 3.0  # no publishing for this long after a failed publish
BACKOFF_FIRST_SECONDS = 0.25  # the listener's first pause before reconnecting; doubled each time
BACKOFF_MAX_SECONDS = 5.0
KEEPALIVE_SECONDS = 5.0  # an idle listener PINGs after this long; no answer in as long again: lost
LISTEN_WAIT_SECONDS = 1.0  # how long one read of the subscription waits


def _client(url: str, read_timeout: float | None) -> redis.Redis:
    # No retries inside redis-py: a failure comes back at once, and we decide what follows.
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=TIMEOUT_SECONDS,
        socket_timeout=read_timeout,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class RedisBell:
    """Publishing (any process that stores events) and, once `listen` ran, the listening thread."""

    def __init__(self, url: str, channel: str = CHANNEL) -> None:
        self.url = url
        self.channel = channel
        self._publisher = _client(url, TIMEOUT_SECONDS)  # its pool is thread-safe and fork-aware
        self._lock = threading.Lock()
        self._quiet_until = 0.0
        self._publish_lost = False
        self._listener: threading.Thread | None = None
        self._listener_pid = 0

    def publish(self, message: str) -> None:
        """Tell every listening process; never raises, and skips Redis for a while after a failure."""
        if time.monotonic() < self._quiet_until:
            return
        try:
            self._publisher.publish(self.channel, message)
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                self._quiet_until = time.monotonic() + QUIET_SECONDS
                said, self._publish_lost = self._publish_lost, True
            if not said:
                log.warning("live fan-out: cannot publish to Redis (%s); other hosts' streams poll the store", exc)
            return
        if self._publish_lost:
            with self._lock:
                said, self._publish_lost = self._publish_lost, False
            if said:
                log.warning("live fan-out: publishing to Redis again")

    def listen(self, wake: Callable[[], None]) -> None:
        """Call `wake` on every message from now on, in a daemon thread (one per process)."""
        with self._lock:
            if self._listener is not None and self._listener_pid == os.getpid():
                return
            self._listener = threading.Thread(target=self._listen_forever, args=(wake,), daemon=True)
            self._listener.name = "live-redis"
            self._listener_pid = os.getpid()
            self._listener.start()

    def _listen_forever(self, wake: Callable[[], None]) -> None:
        pause = BACKOFF_FIRST_SECONDS
        lost = False

        def subscribed() -> None:
            nonlocal pause, lost
            pause = BACKOFF_FIRST_SECONDS
            if lost:
                lost = False
                log.warning("live fan-out: Redis is back; streams wake on other hosts' events again")
            wake()  # what came meanwhile was polled already; one more look costs a query

        while True:
            try:
                self._listen_once(wake, subscribed)
            except Exception as exc:  # Redis gone, or anything else: never end the thread
                if not lost:
                    lost = True
                    log.warning(
                        "live fan-out: lost Redis (%s); streams poll the store each second until it is back", exc
                    )
            time.sleep(pause)
            pause = min(pause * 2, BACKOFF_MAX_SECONDS)

    def _listen_once(self, wake: Callable[[], None], subscribed: Callable[[], None]) -> None:
        """One connection's subscription, until it fails (it raises then)."""
        client = _client(self.url, None)  # a subscription waits for messages as long as it takes
        pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self.channel)
            heard = time.monotonic()
            pinged = False
            while True:
                message = pubsub.get_message(timeout=LISTEN_WAIT_SECONDS)
                now = time.monotonic()
                if message is not None:
                    heard, pinged = now, False
                    if message["type"] == "message":
                        wake()
                    elif message["type"] == "subscribe":
                        subscribed()
                elif now - heard > 2 * KEEPALIVE_SECONDS:
                    raise redis.ConnectionError("no answer to PING")
                elif now - heard > KEEPALIVE_SECONDS and not pinged:
                    pubsub.ping()  # a connection that went silent (no RST) is found this way
                    pinged = True
        finally:
            pubsub.close()
            client.close()
