"""`GET /ws/<channel>`: the live stream over a WebSocket, one text message per event.

The checks are SSE's (`sse.subscription`): refusals are JSON answers before the upgrade. Then the
view answers a 101 that Flask's after_request hooks see (the access log records it, without the
query string, so without a `?token=`), and calling that response as WSGI runs the connection on
the raw socket Gunicorn's gthread worker hands over (`environ["gunicorn.socket"]`), with the
`websockets` package's sans-I/O protocol, and ends by raising StopIteration: Gunicorn's worker
takes that as "close the connection" and writes nothing after our frames, logging nothing.

One thread per connection, the request's own, does everything: `follow` (the subscription),
writing, reading and keepalive. The socket is non-blocking; between events, and whenever `follow`
looks at `stopping` while idle (at least once a second), `Connection.pump` reads what came in
(the protocol answers pings, and a Close frame ends the stream), writes what the socket takes
and pings every PING_SECONDS. A ping unanswered for PONG_SECONDS means a dead client: the
connection is dropped. Outgoing bytes are bounded: above HIGH_WATER the thread waits for the
client to read before taking the next event, so a subscriber that cannot keep up leaves its
events in the hub's buffer until that overflows, and is then closed with 1013 and the reason;
it resumes with `?since=` from the last id it got and loses nothing. A worker stop closes every
stream with 1001 within about a second.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from typing import Any

from flask import Blueprint, Response, request
from websockets.datastructures import Headers
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.http11 import Response as HandshakeResponse
from websockets.protocol import SEND_EOF, State
from websockets.server import ServerProtocol
from werkzeug.exceptions import BadRequest, HTTPException
from werkzeug.exceptions import NotImplemented as NotImplementedHere

from webhook_server.live.service import stopping
from webhook_server.live.sse import subscription
from webhook_server.live.stream import Item, Overflow, Reset, follow
from webhook_server.ops.metrics import live_subscriber, record_streamed
from webhook_server.store.extension import get_store
from webhook_server.store.records import StoredEvent

bp = Blueprint("live_ws", __name__)
log = logging.getLogger(__name__)
# The protocol's own logger: quiet, since at DEBUG it would log every frame (payloads included).
protocol_log = logging.getLogger("webhook_server.live.websocket.protocol")
protocol_log.setLevel(logging.WARNING)

PING_SECONDS = 15.0  # the contract: a heartbeat at least every 25 s
PONG_SECONDS = 20.0  # a ping unanswered this long: the client is gone
HIGH_WATER = 256 * 1024  # bytes written but not taken by the socket before we wait for the client
WAIT_SECONDS = 0.5  # the longest wait for the socket before looking at the clock and `stopping`
CLOSE_SECONDS = 5.0  # the closing handshake: our Close frame out, the client's back
STOP_CLOSE_SECONDS = 1.0  # the same when the worker stops
LINGER_SECONDS = 0.5  # after our half-close, the client's
MAX_MESSAGE = 64 * 1024  # subscribers send nothing but control frames; anything bigger is refused
READ_BYTES = 65536
READ_LIMIT_FACTOR = 4  # no reading while more than this many high-water marks wait to be written


class UpgradeRequired(HTTPException):
    code = 426
    description = "This is a WebSocket endpoint: connect with a WebSocket client (or use /events/ for SSE)."

    def get_headers(self, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
        return [*super().get_headers(*args, **kwargs), ("Upgrade", "websocket")]


@bp.get("/ws/<path:channels>", websocket=True)
def websocket(channels: str) -> Response:
    live, sources, since = subscription()
    raw = request.args.get("raw") == "1"
    sock = request.environ.get("gunicorn.socket")
    if not isinstance(sock, socket.socket):
        raise NotImplementedHere("WebSocket streams need the server's Gunicorn workers (webhook-server web).")
    protocol = ServerProtocol(max_size=MAX_MESSAGE, logger=protocol_log)
    # The path without the query: the protocol never sees a ?token=.
    handshake = protocol.accept(Request(request.path, Headers(request.headers.items())))
    if handshake.status_code != 101:
        raise BadRequest(handshake.body.decode(errors="replace").strip() or "Not a WebSocket handshake.")
    store = get_store()
    live.take_place()  # 503 now, before the upgrade, when this process is full; `run` gives it back

    def run(response_headers: Iterable[tuple[str, str]]) -> None:
        try:
            with live_subscriber(channels):
                for name, value in response_headers:
                    if name == "X-Request-Id":
                        handshake.headers[name] = value
                frames = ServerProtocol(state=State.OPEN, max_size=MAX_MESSAGE, logger=protocol_log)
                connection = Connection(sock, frames)
                connection.open(handshake, protocol)
                connection.run(lambda should_stop: follow(store, live.hub, sources, since, should_stop), raw)
        finally:
            live.leave()

    return Upgraded(run)


@bp.get("/ws/<path:channels>")
def not_websocket(channels: str) -> Response:
    """A plain GET: the same refusals, then 426 (a WebSocket client sends Upgrade)."""
    subscription()
    raise UpgradeRequired()


class Upgraded(Response):
    """The 101 as Flask sees it; called as WSGI it runs the connection and raises StopIteration, which
    Gunicorn's gthread worker takes as "close this connection" (nothing written, nothing logged)."""

    def __init__(self, run: Callable[[Iterable[tuple[str, str]]], None]) -> None:
        super().__init__(status=101)
        self.run = run

    def __call__(self, environ: Any, start_response: Any) -> Iterable[bytes]:
        try:
            self.run(list(self.headers.items()))
        except Exception:  # the socket is ours: Gunicorn must not answer a 500 on it
            log.exception("live websocket: the connection failed")
        raise StopIteration


def message(item: StoredEvent | Reset, raw: bool) -> bytes:
    """One text message."""
    if isinstance(item, Reset):
        return json.dumps({"type": "reset", "oldest": str(item.oldest)}, separators=(",", ":")).encode()
    return item.encoded(raw).encode()  # encoded once per event, however many subscribers take it


class Connection:
    """One WebSocket on a raw socket, read and written by one thread."""

    def __init__(
        self,
        sock: socket.socket,
        protocol: ServerProtocol,
        ping_seconds: float = PING_SECONDS,
        pong_seconds: float = PONG_SECONDS,
        high_water: int = HIGH_WATER,
        service_stopping: Callable[[], bool] = stopping,
    ) -> None:
        self.sock = sock
        self.protocol = protocol
        self.ping_seconds = ping_seconds
        self.pong_seconds = pong_seconds
        self.high_water = high_water
        self.service_stopping = service_stopping
        self.out = bytearray()  # bytes the socket has not taken yet
        self.eof_pending = False  # half-close once `out` is written
        self.eof_written = False
        self.peer_gone = False  # EOF or a socket error: nothing more can be read or written
        self.dead = False  # stopped answering pings
        self.next_ping = time.monotonic() + ping_seconds
        self.ping_payload: bytes | None = None
        self.ping_sent = 0.0
        self.selector = selectors.DefaultSelector()

    # -- the stream

    def open(self, handshake: HandshakeResponse, accepted_by: ServerProtocol) -> None:
        """Send the 101 that `accepted_by` made (its parser still waits for a request: we did not
        feed it one, Gunicorn had read it); frames then go through `self.protocol`, made OPEN."""
        accepted_by.send_response(handshake)
        self.out += b"".join(accepted_by.data_to_send())
        self.sock.setblocking(False)
        self.selector.register(self.sock, selectors.EVENT_READ)
        self.pump(0)

    def run(self, items: Callable[[Callable[[], bool]], Iterator[Item]], raw: bool) -> None:
        """Send what `items(should_stop)` yields until it ends, the client goes, or the worker stops."""
        stream = items(self.idle)
        try:
            for item in stream:
                if isinstance(item, StoredEvent | Reset):
                    self.protocol.send_text(message(item, raw))
                    if isinstance(item, StoredEvent):
                        record_streamed("ws")
                elif isinstance(item, Overflow):
                    record_streamed("ws", 0, overflow=True)
                    self.close(CloseCode.TRY_AGAIN_LATER, item.reason, CLOSE_SECONDS)
                    return
                self.drain()
                if self.over:
                    break
            self.end()
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # the hub forgets this subscriber now, not when the generator is collected
            self.finish()

    def idle(self) -> bool:
        """`follow`'s `stopping`: it looks at least once a second while no event comes."""
        self.pump(0)
        return self.over

    @property
    def over(self) -> bool:
        return self.service_stopping() or self.dead or self.peer_gone or self.protocol.state is not State.OPEN

    def drain(self) -> None:
        """Write what the socket takes; above the high-water mark, wait for the client to read."""
        self.pump(0)
        while len(self.out) > self.high_water and not self.over:
            self.pump(WAIT_SECONDS)

    def end(self) -> None:
        """The stream is over for a reason other than an overflow: say why when we still can."""
        if self.dead:
            log.info("live websocket %s: no pong for %.0f s, dropped", request_path(), self.pong_seconds)
        elif self.peer_gone or self.protocol.state is not State.OPEN:
            self.close_handshake(CLOSE_SECONDS)  # the client's Close was echoed; finish the handshake
        elif self.service_stopping():
            self.close(CloseCode.GOING_AWAY, "server stopping", STOP_CLOSE_SECONDS)
        else:
            self.close(CloseCode.NORMAL_CLOSURE, "", CLOSE_SECONDS)

    def close(self, code: int, reason: str, seconds: float) -> None:
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason.encode()[:120].decode(errors="ignore"))
        self.close_handshake(seconds)

    def close_handshake(self, seconds: float) -> None:
        """Our Close frame out and the client's back (then the protocol half-closes), or the time is up."""
        deadline = time.monotonic() + (min(seconds, STOP_CLOSE_SECONDS) if self.service_stopping() else seconds)
        while not (self.eof_written or self.peer_gone) and time.monotonic() < deadline:
            self.pump(min(WAIT_SECONDS, max(deadline - time.monotonic(), 0)))
        if not self.eof_written:
            return
        linger = time.monotonic() + LINGER_SECONDS  # the client closes once it sees our FIN
        while not self.peer_gone and time.monotonic() < linger:
            self.pump(min(WAIT_SECONDS, max(linger - time.monotonic(), 0)))

    def finish(self) -> None:
        """Leave the socket shut for Gunicorn to close (at once: nothing left to drain)."""
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with suppress(KeyError, ValueError, OSError):
            self.selector.unregister(self.sock)
        self.selector.close()

    # -- the socket

    def pump(self, timeout: float) -> None:
        """Read what came, write what the socket takes, keep alive; wait up to `timeout` for the socket."""
        self.keepalive()
        self.collect()
        if self.peer_gone:
            return
        # A client that sends (pings) but does not read would grow `out` with pongs: past the
        # limit it is not read either, and TCP holds it back.
        reading = len(self.out) <= READ_LIMIT_FACTOR * self.high_water
        wanted = (selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if self.out else 0)
        self.selector.modify(self.sock, wanted)
        ready = 0
        for _, mask in self.selector.select(timeout if timeout > 0 else 0):
            ready |= mask
        if ready & selectors.EVENT_READ:
            self.read()
        if self.out or self.eof_pending:
            self.write()

    def read(self) -> None:
        try:
            data = self.sock.recv(READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.peer_gone = True
            return
        if not data:
            self.peer_gone = True
            self.protocol.receive_eof()
        else:
            self.protocol.receive_data(data)
            for event in self.protocol.events_received():
                if isinstance(event, Frame) and event.opcode is Opcode.PONG and event.data == self.ping_payload:
                    self.ping_payload = None
                    self.next_ping = time.monotonic() + self.ping_seconds
        self.collect()

    def write(self) -> None:
        try:
            while self.out:
                written = self.sock.send(self.out)
                del self.out[:written]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.peer_gone = True
            self.out.clear()
            return
        if self.eof_pending and not self.eof_written:
            with suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            self.eof_written = True

    def collect(self) -> None:
        for data in self.protocol.data_to_send():
            if data == SEND_EOF:
                self.eof_pending = True
            else:
                self.out += data

    def keepalive(self) -> None:
        if self.protocol.state is not State.OPEN:
            return
        now = time.monotonic()
        if self.ping_payload is not None:
            if now - self.ping_sent > self.pong_seconds:
                self.dead = True
        elif now >= self.next_ping:
            self.ping_payload = os.urandom(4)
            self.ping_sent = now
            self.protocol.send_ping(self.ping_payload)


def request_path() -> str:
    try:
        return request.path[:200]
    except RuntimeError:  # outside a request (tests)
        return "-"
