"""Forwarding an event to an HTTP target: the body, its encryption, its signature, the POST.

The request is the contract's: a POST with `webhook-id` (the same on every try of one delivery,
so a receiver de-duplicates), `webhook-timestamp` (of the try) and `webhook-signature` made with
the `standardwebhooks` package, and `X-Webhook-Event-Id`. With `encrypt_to` the body is a JWE in
compact form (RSA-OAEP-256 wrapping a random key, A256GCM over the body: any size), made with
jwcrypto, and signed like any other body.

The POST follows no redirect, has connection and read timeouts, and reads at most
MAX_RESPONSE_BYTES of the answer. Nothing it reports names the URL (which may hold a token):
what fails is said as a status or a kind of network error.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import socket
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import urllib3
from jwcrypto.jwe import JWE
from standardwebhooks.webhooks import Webhook
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ProtocolError, TimeoutError

from webhook_server.ingest.targets import Target
from webhook_server.store.records import StoredEvent

MAX_RESPONSE_BYTES = 64 * 1024
MAX_RETRY_AFTER_SECONDS = 3600.0
USER_AGENT = "webhook-server"
# 408 Request Timeout, 425 Too Early, 429 Too Many Requests, and every 5xx are worth a retry.
TEMPORARY_STATUSES = frozenset({408, 425, 429})
JWE_HEADER = {"alg": "RSA-OAEP-256", "enc": "A256GCM"}


@dataclass(frozen=True)
class Outcome:
    """What one POST came to: delivered, or why not, and whether a retry may help."""

    delivered: bool
    temporary: bool = False
    error: str = ""
    retry_after: float | None = None  # what the target asked for, capped at an hour


def body_of(target: Target, event: StoredEvent) -> tuple[bytes, str]:
    """(body, content type) before encryption: the event JSON, or the body as received."""
    if target.body == "payload" and event.received is not None:
        return event.received.body, event.received.content_type or "application/octet-stream"
    return event.encoded().encode(), "application/json"


def encrypted(target: Target, body: bytes, content_type: str) -> tuple[bytes, str]:
    """The body as a compact JWE to the target's public key; `cty` says what is inside."""
    token = JWE(body, protected=json.dumps({**JWE_HEADER, "cty": content_type}))
    token.add_recipient(target.encrypt_to)
    return token.serialize(compact=True).encode("ascii"), "application/jose"


def message_id(event_id: str, delivery_id: int) -> str:
    """The `webhook-id` of one delivery: every retry of it carries the same."""
    return f"msg_{event_id}_{delivery_id}"


def signed_headers(target: Target, msg_id: str, event_id: str, body: bytes, content_type: str) -> dict[str, str]:
    """The Standard Webhooks headers for this try, and ours."""
    now = datetime.now(UTC)
    # Bodies are UTF-8: JSON and forms were checked at the way in, and a JWE is ASCII.
    signature = Webhook(target.secret).sign(msg_id, now, body.decode("utf-8", "surrogateescape"))
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(math.floor(now.timestamp())),
        "webhook-signature": signature,
        "X-Webhook-Event-Id": event_id,
        "Content-Type": content_type,
        "User-Agent": USER_AGENT,
    }


def request_for(target: Target, event: StoredEvent, delivery_id: int) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one try."""
    body, content_type = body_of(target, event)
    if target.encrypt_to is not None:
        body, content_type = encrypted(target, body, content_type)
    return body, signed_headers(target, message_id(event.id, delivery_id), event.id, body, content_type)


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds (a number or an HTTP date), at most an hour; None when absent or bad."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS) if math.isfinite(seconds) else None


def outcome_of(status: int, retry_after_header: str | None) -> Outcome:
    """2xx delivered; 408, 425, 429 and 5xx temporary; anything else (3xx too) permanent."""
    if 200 <= status < 300:
        return Outcome(True)
    temporary = status in TEMPORARY_STATUSES or 500 <= status < 600
    return Outcome(False, temporary, f"HTTP {status}", retry_after(retry_after_header) if temporary else None)


def network_error(exc: Exception, timeout: float) -> Outcome:
    """A failure before an answer, said without the URL that urllib3's messages carry."""
    if isinstance(exc, NewConnectionError):  # before TimeoutError: urllib3 makes it a subclass
        return Outcome(False, True, "connection failed")
    if isinstance(exc, TimeoutError):
        return Outcome(False, True, f"no answer within {timeout:g} s")
    if isinstance(exc, ProtocolError):
        return Outcome(False, True, "connection broken")
    return Outcome(False, True, f"network error ({type(exc).__name__})")


# The connection each sending thread is using now, and that thread's deadline, so that the
# deadline can cut the connection off: from the moment it connects, not only once it sends.
_IN_USE: dict[int, HTTPConnection] = {}
_DEADLINES: dict[int, Deadline] = {}


def _watch(connection: HTTPConnection) -> None:
    """Register `connection` for this thread's deadline; refuse to go on past it."""
    thread = threading.get_ident()
    _IN_USE[thread] = connection
    deadline = _DEADLINES.get(thread)
    if deadline is not None and deadline.expired:
        raise ConnectTimeoutError(connection, "the try's deadline passed")


class _Watched(HTTPConnection):
    """A connection its thread's deadline can reach from the moment it connects."""

    def connect(self) -> None:
        _watch(self)
        super().connect()  # for HTTPS the TLS handshake too: its socket exists, and a cut ends it
        _watch(self)  # the deadline may have passed while connecting, with no socket to cut yet

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch(self)
        super().request(*args, **kwargs)


class _WatchedHTTP(_Watched):
    pass


class _WatchedHTTPS(_Watched, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTP


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPS


class Deadline:
    """`timeout_seconds` for the whole try: urllib3's read timeout bounds each read, and a target
    that trickles a byte at a time would hold the send (and outlive its lease) for ever."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self.done = False
        self._thread = threading.get_ident()
        self._lock = threading.Lock()  # a cut never reaches a connection already back in the pool

    def cut(self) -> None:
        """Shut the connection this try is using, if it is still going: its blocked read returns.
        Before a connection exists the try is stopped when it gets one (`_watch`)."""
        with self._lock:
            if self.done:  # over: the thread's connection now belongs to a later try
                return
            self.expired = True
            sock = getattr(_IN_USE.get(self._thread), "sock", None)
            if sock is not None:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        """The try is over: a cut from now on leaves its connection (back in the pool) alone."""
        with self._lock:
            self.done = True
            _IN_USE.pop(self._thread, None)
            _DEADLINES.pop(self._thread, None)

    def __enter__(self) -> Deadline:
        _DEADLINES[self._thread] = self
        WATCHDOG.watch(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


class Watchdog:
    """One thread that cuts every try still running at its deadline (a Timer per try was a thread
    started per request)."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, Deadline]] = []
        self._changed = threading.Condition()
        self._numbers = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: Deadline) -> None:
        with self._changed:
            heapq.heappush(self._due, (time.monotonic() + deadline.seconds, next(self._numbers), deadline))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="forward-deadlines", daemon=True)
                self._thread.start()
            self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._changed.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, _, deadline = heapq.heappop(self._due)
            deadline.cut()


WATCHDOG = Watchdog()


class HttpTransport:
    """Connection pools to the targets, shared by the worker's threads."""

    def __init__(self, connections: int) -> None:
        self.pools = urllib3.PoolManager(maxsize=connections, block=False, retries=False)
        self.pools.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    def post(self, target: Target, body: bytes, headers: dict[str, str]) -> Outcome:
        """One POST within the target's timeout; the status and at most MAX_RESPONSE_BYTES are read."""
        timeout = urllib3.Timeout(connect=min(target.timeout_seconds, 10.0), read=target.timeout_seconds)
        with Deadline(target.timeout_seconds) as deadline:
            try:
                response = self.pools.request(
                    "POST", target.url, body=body, headers=headers, timeout=timeout,
                    retries=False, redirect=False, preload_content=False,
                )  # fmt: skip
            except (HTTPError, OSError) as exc:
                deadline.finish()
                return network_error(TimeoutError() if deadline.expired else exc, target.timeout_seconds)
            whole = read_answer(response)
            deadline.finish()  # before the connection can go back to the pool
        if deadline.expired or not whole:  # cut off, or more than we read: not reused
            response.close()
        else:
            response.release_conn()
        if deadline.expired:  # cut off while the answer was read: it may not be whole
            return network_error(TimeoutError(), target.timeout_seconds)
        return outcome_of(response.status, response.headers.get("Retry-After"))


def read_answer(response: urllib3.BaseHTTPResponse) -> bool:
    """Read the answer's body, at most MAX_RESPONSE_BYTES; True when that was all of it."""
    try:
        return len(response.read(MAX_RESPONSE_BYTES + 1)) <= MAX_RESPONSE_BYTES
    except (HTTPError, OSError):
        return False  # the status is what counts
