"""A forwarding target for the tests: a real HTTP server on loopback that verifies every request
with the `standardwebhooks` package, decrypts JWE bodies with jwcrypto, and answers as scripted."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from jwcrypto import jwk
from jwcrypto.jwe import JWE
from standardwebhooks.webhooks import Webhook


@dataclass(frozen=True)
class Reply:
    """How to answer one request: a status after `delay` seconds, with headers and a body."""

    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    trickle: float = 0.0  # seconds between the bytes of the answer (a target that drips it)


@dataclass
class Arrival:
    """One request as the target saw it."""

    at: float  # time.monotonic()
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what it was answered
    verified: bool  # the Standard Webhooks signature checked out
    plaintext: bytes | None  # the body, decrypted when it was a JWE
    jwe_header: dict[str, Any] | None = None

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def event_id(self) -> str:
        return self.headers.get("x-webhook-event-id", "")

    def event(self) -> Any:
        """The delivered body as JSON (decrypted first if need be)."""
        return json.loads(self.plaintext if self.plaintext is not None else self.body)


class Receiver:
    """`with Receiver(secret) as r:` serves on `r.url`; `r.script(path, Reply, ...)` queues answers."""

    def __init__(self, secret: str, private_key: jwk.JWK | None = None) -> None:
        self.secret = secret
        self.private_key = private_key
        self.arrivals: list[Arrival] = []
        self._scripts: dict[str, deque[Reply]] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def script(self, path: str, *replies: Reply) -> None:
        with self._lock:
            self._scripts.setdefault(path, deque()).extend(replies)

    def next_reply(self, path: str) -> Reply:
        with self._lock:
            queued = self._scripts.get(path)
            return queued.popleft() if queued else Reply()

    def record(self, arrival: Arrival) -> None:
        with self._changed:
            self.arrivals.append(arrival)
            self._changed.notify_all()

    def delivered(self, path: str | None = None) -> list[Arrival]:
        """The requests answered 2xx (to `path`, if given), in arrival order."""
        with self._lock:
            return [a for a in self.arrivals if 200 <= a.status < 300 and path in (None, a.path)]

    def wait_for(self, count: int, path: str | None = None, timeout: float = 20.0) -> list[Arrival]:
        """Wait until `count` requests were answered 2xx; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len([a for a in self.arrivals if 200 <= a.status < 300 and path in (None, a.path)]) < count:
                if not self._changed.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"{count} deliveries did not arrive; got {len(self.arrivals)} requests")
        return self.delivered(path)

    def check(self, headers: dict[str, str], body: bytes) -> tuple[bool, bytes | None, dict[str, Any] | None]:
        """(signature verified, decrypted body, JWE protected header) of one request."""
        try:
            Webhook(self.secret).verify(body, headers, json_parse=False)
            verified = True
        except Exception:
            verified = False
        if headers.get("content-type") != "application/jose" or self.private_key is None:
            return verified, None, None
        token = JWE()
        token.deserialize(body.decode("ascii"), key=self.private_key)
        return verified, bytes(token.payload), json.loads(token.objects["protected"])

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real targets do
            # Headers and body go in two writes: with Nagle on, each answer waited 40 ms for an ACK.
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                expected = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(expected)
                if len(body) < expected:  # the sender died mid-request (kill -9): not a request at all
                    self.close_connection = True
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                reply = receiver.next_reply(self.path)
                if reply.delay:
                    time.sleep(reply.delay)
                verified, plaintext, header = receiver.check(headers, body)
                arrival = Arrival(time.monotonic(), self.path, headers, body, reply.status, verified, plaintext, header)
                # Kept before the answer goes out: a client that has its answer finds it here.
                receiver.record(arrival)
                try:
                    if reply.trickle:
                        self.drip(reply)
                    else:
                        self.send_response(reply.status)
                        for name, value in reply.headers.items():
                            self.send_header(name, value)
                        self.send_header("Content-Length", str(len(reply.body)))
                        self.end_headers()
                        self.wfile.write(reply.body)
                except OSError:  # the client gave up (its timeout): it never got this answer
                    arrival.status = 0

            def drip(self, reply: Reply) -> None:
                answer = f"HTTP/1.1 {reply.status} OK\r\nContent-Length: {len(reply.body)}\r\n\r\n".encode()
                for byte in answer + reply.body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(reply.trickle)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def __enter__(self) -> Receiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
