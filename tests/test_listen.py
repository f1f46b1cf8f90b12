"""`webhook-server listen`: the SSE parser, backoff and state file, and the real command against a
fake stream server (as the live-stream spec describes it) and a small local receiver."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from webhook_server.live import listen
from webhook_server.live.listen import Backoff, Catchup, Listener, Message, Options, Retry, SSEParser

TOKEN = "tok-Zq81-never-printed-7Hc"
CHANNEL = "alerts"
GITHUB_SECRET = b"github-hook-secret"
HEARTBEAT = 0.2


def plain(event: dict[str, Any]) -> dict[str, Any]:
    """The event as a stream without ?raw=1 sends it."""
    return {k: v for k, v in event.items() if k not in ("content_type", "headers", "body_base64")}


def wait_until(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll until the condition holds (returning its value), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def github_signature(body: bytes) -> str:
    return "sha256=" + hmac.new(GITHUB_SECRET, body, hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------- the fake stream server


class StreamServer:
    """`GET /events/<channel>` as the spec says: a store of events, cursors, reset, overflow, errors.

    `plans` says what each next connection does ({} = follow the stream): status (an error
    answer, with retry_after), close_after / overflow_after (n events), silent (send nothing)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.oldest_kept = 1
        self.plans: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        self.stopping = False
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True).start()

    def add(self, body: bytes | None = None, headers: list[list[str]] | None = None, age: float = 0.0) -> str:
        """Store (and publish) one GitHub-style event; its id."""
        with self.changed:
            event_id = str(int(self.events[-1]["id"]) + 1 if self.events else self.oldest_kept)
            body = body if body is not None else json.dumps({"ref": "refs/heads/main", "n": int(event_id)}).encode()
            received = datetime.now(UTC) - timedelta(seconds=age)
            self.events.append(
                {
                    "id": event_id,
                    "source": "github",
                    "received_at": received.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "event": "push",
                    "device": None,
                    "payload": json.loads(body),
                    "content_type": "application/json",
                    "headers": headers or [["X-GitHub-Event", "push"], ["X-Hub-Signature-256", github_signature(body)]],
                    "body_base64": base64.b64encode(body).decode(),
                }
            )
            self.changed.notify_all()
        return event_id

    def after(self, position: int) -> dict[str, Any] | None:
        """The first stored event after the position, waiting a heartbeat's time for one."""
        with self.changed:
            for _ in range(2):
                for event in self.events:
                    if int(event["id"]) > position:
                        return event
                self.changed.wait(HEARTBEAT)
        return None

    def stop(self) -> None:
        self.stopping = True
        self.http.shutdown()
        self.http.server_close()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(StreamHandler):
            fake = server

        return Handler


class StreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # a streamed answer is chunked, as from Gunicorn
    fake: StreamServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        cursor = self.headers.get("Last-Event-ID") or (query.get("since") or [None])[0]
        authorization, now = self.headers.get("Authorization"), time.monotonic()
        self.fake.requests.append({"path": self.path, "authorization": authorization, "cursor": cursor, "at": now})
        plan = self.fake.plans.pop(0) if self.fake.plans else {}
        if plan.get("status"):
            return self.error(plan["status"], "busy", plan.get("retry_after"))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.error(401, "unauthorized")
        if unquote(url.path) != f"/events/{CHANNEL}":
            return self.error(404, "not_found")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            self.stream(cursor, query.get("raw") == ["1"], plan)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        self.close_connection = True

    def error(self, status: int, error: str, retry_after: str | None = None) -> None:
        body = json.dumps({"error": error, "message": f"{error} (as the fake says)"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if retry_after:
            self.send_header("Retry-After", retry_after)
        self.end_headers()
        self.wfile.write(body)

    def send(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def start(self, cursor: str | None) -> int:
        """The position to stream after, sending a reset first when the cursor is unknown."""
        with self.fake.changed:
            newest = int(self.fake.events[-1]["id"]) if self.fake.events else 0
        if cursor is None:
            return newest
        oldest = self.fake.oldest_kept
        if int(cursor) < oldest - 1 or int(cursor) > newest:
            self.send(f'event: reset\ndata: {{"type": "reset", "oldest": "{oldest}"}}\n\n')
            return oldest - 1
        return int(cursor)

    def stream(self, cursor: str | None, raw: bool, plan: dict[str, Any]) -> None:
        self.send(": hello\n\n")
        if plan.get("silent"):
            while not self.fake.stopping:
                time.sleep(0.05)
            return
        position, sent = self.start(cursor), 0
        while not self.fake.stopping:
            event = self.fake.after(position)
            if event is None:
                self.send(": heartbeat\n\n")
                continue
            if sent == plan.get("close_after"):
                return
            if sent == plan.get("overflow_after"):
                self.send('event: overflow\ndata: {"type": "overflow", "limit": 1}\n\n')
                return
            shown = event if raw else plain(event)
            self.send(f"id: {event['id']}\nevent: message\ndata: {json.dumps(shown)}\n\n")
            position, sent = int(event["id"]), sent + 1


# --------------------------------------------------------------------------- the local app


class Receiver:
    """A local app for --forward: records each POST; answers from `answers`, then 204 (401 on a bad signature)."""

    def __init__(self, port: int = 0) -> None:
        self.received: list[dict[str, Any]] = []
        self.answers: list[int] = []
        self.http = ThreadingHTTPServer(("127.0.0.1", port), self.handler())
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/hook?from=listen"
        threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True).start()

    def ids(self, answered: int | None = None) -> list[str]:
        return [r["headers"]["X-Webhook-Event-Id"] for r in self.received if answered in (None, r["status"])]

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                valid = hmac.compare_digest(self.headers.get("X-Hub-Signature-256", ""), github_signature(body))
                status = receiver.answers.pop(0) if receiver.answers else (204 if valid else 401)
                receiver.received.append(
                    {"path": self.path, "headers": self.headers, "pairs": self.headers.items(), "body": body}
                    | {"valid": valid, "status": status}
                )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler


# --------------------------------------------------------------------------- the real command


class Listen:
    """`python -m webhook_server listen` as a child process, its output collected line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "webhook_server", "listen", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err)):
            threading.Thread(target=self.collect, args=(stream, lines), daemon=True).start()

    @staticmethod
    def collect(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.err)

    def printed_ids(self) -> list[str]:
        return [line.split("  ")[1] for line in self.out]

    def wait_for_lines(self, count: int, timeout: float = 10.0) -> list[str]:
        wait_until(lambda: len(self.out) >= count, timeout)
        return self.out

    def wait_for_stderr(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        wait_until(lambda: self.stderr.count(text) >= count, timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=10)
        time.sleep(0.05)  # the reader threads catch up
        assert TOKEN not in "\n".join(self.out) + self.stderr


@pytest.fixture
def server() -> Iterator[StreamServer]:
    fake = StreamServer()
    yield fake
    fake.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    app = Receiver()
    yield app
    app.stop()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "listen-state.json"


@pytest.fixture
def run_listen(server: StreamServer, state: Path) -> Iterator[Callable[..., Listen]]:
    started: list[Listen] = []

    def start(*extra: str, token: str = TOKEN, channel: str = CHANNEL) -> Listen:
        child = Listen(channel, "--url", server.url, "--token", token, "--state", str(state), *extra)
        started.append(child)
        return child

    yield start
    for child in started:
        child.stop()


def from_start(state: Path) -> None:
    """A state file positioned before the first event, so listen gets the whole store."""
    state.write_text(json.dumps({"last_id": "0"}))


def saved(state: Path) -> str | None:
    return json.loads(state.read_text())["last_id"] if state.exists() else None


def test_prints_one_readable_line_per_event_and_saves_the_position(
    server: StreamServer, state: Path, run_listen: Callable[..., Listen]
) -> None:
    from_start(state)
    for _ in range(3):
        server.add()
    child = run_listen()
    lines = child.wait_for_lines(3)
    assert child.printed_ids() == ["1", "2", "3"]
    assert "github/push" in lines[0] and '{"ref":"refs/heads/main","n":1}' in lines[0]
    assert lines[0].startswith(server.events[0]["received_at"])
    wait_until(lambda: saved(state) == "3")
    server.add()
    child.wait_for_lines(4)
    assert child.printed_ids() == ["1", "2", "3", "4"]
    assert "connected to" in child.stderr and "resuming after event 0" in child.stderr
    assert "raw=1" not in server.requests[0]["path"]
    assert server.requests[0]["authorization"] == f"Bearer {TOKEN}"


def test_json_prints_each_event_object_on_one_line(
    server: StreamServer, state: Path, run_listen: Callable[..., Listen]
) -> None:
    from_start(state)
    server.add()
    server.add(body='{"text": "line one\\nline two", "café": true}'.encode())
    child = run_listen("--json")
    lines = child.wait_for_lines(2)
    assert [json.loads(line) for line in lines] == [plain(event) for event in server.events]


def test_without_a_state_file_it_starts_at_the_live_tail(
    server: StreamServer, state: Path, run_listen: Callable[..., Listen]
) -> None:
    server.add()
    child = run_listen()
    wait_until(lambda: server.requests)
    assert server.requests[0]["cursor"] is None
    child.wait_for_stderr("connected to")
    server.add()
    child.wait_for_lines(1)
    assert child.printed_ids() == ["2"]


def test_forward_sends_the_exact_bytes_and_sender_headers(
    server: StreamServer, state: Path, receiver: Receiver, run_listen: Callable[..., Listen]
) -> None:
    from_start(state)
    body = b'{"ref":  "refs/heads/main",\n "pusher": {"name": "Zo\xc3\xab"}, "n": 1}  '
    headers = [
        ["X-GitHub-Event", "push"],
        ["X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"],
        ["X-Hub-Signature-256", github_signature(body)],
        ["User-Agent", "GitHub-Hookshot/044aadd"],
        ["Connection", "keep-alive"],
        ["Host", "hooks.example.com"],
        ["Content-Length", "9999"],
    ]
    server.add(body=body, headers=headers)
    child = run_listen("--forward", receiver.url)
    wait_until(lambda: receiver.received)
    request = receiver.received[0]
    assert request["body"] == body and request["valid"] and request["status"] == 204
    assert request["path"] == "/hook?from=listen"
    assert request["pairs"] == [
        ("Host", receiver.url.split("/")[2]),
        ("Content-Type", "application/json"),
        *[(name, value) for name, value in headers[:4]],
        ("X-Webhook-Event-Id", "1"),
        ("Content-Length", str(len(body))),
    ]
    assert "raw=1" in server.requests[0]["path"]
    child.wait_for_lines(1)
    assert child.out[0].endswith("-> 204")
    wait_until(lambda: saved(state) == "1")


def test_the_position_is_saved_only_after_the_local_app_answers_2xx(
    server: StreamServer, state: Path, receiver: Receiver, run_listen: Callable[..., Listen]
) -> None:
    receiver.answers = [500, 503]
    child = run_listen("--forward", receiver.url)
    child.wait_for_stderr("connected to")
    server.add()
    wait_until(lambda: len(receiver.received) >= 2)
    assert not state.exists()  # the next try comes about a second later
    assert child.out == []
    wait_until(lambda: saved(state) == "1")
    assert [r["status"] for r in receiver.received] == [500, 503, 204]
    assert child.stderr.count("event 1 not handled") == 2
    assert "answered 500" in child.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_local_app_that_is_down_for_a_while_loses_nothing_and_gets_nothing_twice(
    server: StreamServer, state: Path, run_listen: Callable[..., Listen]
) -> None:
    from_start(state)
    for _ in range(5):
        server.add()
    port = free_port()
    child = run_listen("--forward", f"http://127.0.0.1:{port}/hook")
    child.wait_for_stderr("cannot reach", count=2)
    assert saved(state) == "0"
    app = Receiver(port)
    try:
        wait_until(lambda: len(app.received) >= 5)
        server.add()
        wait_until(lambda: len(app.received) >= 6)
        time.sleep(0.3)
        assert app.ids() == ["1", "2", "3", "4", "5", "6"]
        wait_until(lambda: saved(state) == "6")
    finally:
        app.stop()


def test_a_dropped_connection_resumes_after_the_last_handled_event(
    server: StreamServer, state: Path, run_listen: Callable[..., Listen]
) -> None:
    from_start(state)
    for _ in range(5):
        server.add()
    server.plans = [{"close_after": 2}]
    child = run_listen()
    child.wait_for_lines(5)
    assert child.printed_ids() == ["1", "2", "3", "4", "5"]
    assert [r["cursor"] for r in server.requests] == ["0", "2"]
    assert "the server closed the stream; reconnecting in" in child.stderr
    assert "reconnected to" in child.stderr and "resuming after event 2" in child.stderr


def test_a_restart_catches_up_what_it_missed_then_goes_live(
    server: StreamServer, state: Path, run_listen: Callable[..., Listen]
) -> None:
    from_start(state)
    server.add(age=60)
    first = run_listen()
    first.wait_for_lines(1)
    first.stop()
    for _ in range(3):
        server.add(age=30)
    second = run_listen()
    second.wait_for_lines(3)
    second.wait_for_stderr("caught up 3 missed event(s)")
    assert "resuming after event 1" in second.stderr
    server.add()
    second.wait_for_lines(4)
    assert second.printed_ids() == ["2", "3", "4", "5"]


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_ends_it_with_the_position_of_the_last_printed_event(
    server: StreamServer, state: Path, run_listen: Callable[..., Listen], signum: int, status: int
) -> None:
    from_start(state)
    for _ in range(3):
        server.add()
    child = run_listen()
    child.wait_for_lines(1)
    child.process.send_signal(signum)
    assert child.process.wait(timeout=10) == status
    time.sleep(0.05)  # the reader threads catch up
    assert saved(state) == child.printed_ids()[-1]
    assert "Traceback" not in child.stderr


def test_a_reset_says_events_were_missed_and_goes_on_from_the_oldest_kept(
    server: StreamServer, state: Path, run_listen: Callable[..., Listen]
) -> None:
    state.write_text(json.dumps({"last_id": "2"}))
    server.oldest_kept = 5
    for _ in range(3):
        server.add()
    child = run_listen()
    child.wait_for_lines(3)
    assert child.printed_ids() == ["5", "6", "7"]
    assert "events were missed" in child.stderr and "oldest kept event 5" in child.stderr
    server.add()
    child.wait_for_lines(4)
    assert saved(state) == "8" or wait_until(lambda: saved(state) == "8")


def test_an_overflow_reconnects_at_once_and_loses_nothing(
    server: StreamServer, state: Path, run_listen: Callable[..., Listen]
) -> None:
    from_start(state)
    for _ in range(3):
        server.add()
    server.plans = [{"overflow_after": 1}]
    child = run_listen()
    child.wait_for_lines(3)
    assert child.printed_ids() == ["1", "2", "3"]
    assert [r["cursor"] for r in server.requests] == ["0", "1"]
    assert "dropped this connection" in child.stderr
    assert "reconnecting in" not in child.stderr  # no backoff pause


def test_a_busy_server_is_retried_after_its_retry_after(
    server: StreamServer, state: Path, run_listen: Callable[..., Listen]
) -> None:
    from_start(state)
    server.add()
    server.plans = [{"status": 503, "retry_after": "1"}]
    child = run_listen()
    child.wait_for_lines(1)
    assert "the server answered 503: busy (as the fake says); reconnecting in" in child.stderr
    assert server.requests[1]["at"] - server.requests[0]["at"] >= 0.8


@pytest.mark.parametrize(
    ("token", "channel", "plan", "status"),
    [("wrong-token", CHANNEL, {}, 401), (TOKEN, CHANNEL, {"status": 403}, 403), (TOKEN, "nope", {}, 404)],
)
def test_refusals_exit_2_at_once(
    server: StreamServer,
    run_listen: Callable[..., Listen],
    token: str,
    channel: str,
    plan: dict[str, Any],
    status: int,
) -> None:
    server.plans = [plan]
    child = run_listen(token=token, channel=channel)
    assert child.process.wait(timeout=10) == 2
    time.sleep(0.05)
    assert len(server.requests) == 1
    assert f"the server answered {status}: " in child.stderr
    assert "wrong-token" not in child.stderr


def test_connection_errors_are_retried_with_backoff(state: Path, tmp_path: Path) -> None:
    child = Listen(CHANNEL, "--url", f"http://127.0.0.1:{free_port()}", "--token", TOKEN, "--state", str(state))
    try:
        child.wait_for_stderr("cannot connect", count=2)
        assert "Connection refused" in child.stderr and child.process.poll() is None
    finally:
        child.stop()


# --------------------------------------------------------------------------- in-process


def test_a_silent_connection_counts_as_dead(server: StreamServer, state: Path) -> None:
    server.plans = [{"silent": True}]
    options = Options(server.url, CHANNEL, TOKEN, state=state, idle_timeout=0.3)
    listener = Listener(options, io.StringIO(), io.StringIO())
    started = time.monotonic()
    with pytest.raises(Retry, match=r"nothing from the server for 0.3 s"):
        listener.session()
    assert time.monotonic() - started < 3


def test_forward_retries_the_same_event_with_growing_pauses(state: Path) -> None:
    pauses: list[float] = []

    def pause(delay: float) -> None:
        pauses.append(delay)
        if len(pauses) == 4:
            raise KeyboardInterrupt

    options = Options("http://127.0.0.1:1", CHANNEL, TOKEN, forward=f"http://127.0.0.1:{free_port()}/", state=state)
    listener = Listener(options, io.StringIO(), io.StringIO(), sleep=pause)
    event = {"id": "7", "payload": {}, "body_base64": base64.b64encode(b"{}").decode()}
    with pytest.raises(KeyboardInterrupt):
        listener.message(Message("7", "message", json.dumps(event)), Catchup(False, datetime.now(UTC)))
    for pause_, nominal in zip(pauses, (0.5, 1, 2, 4), strict=True):
        assert nominal * 0.8 <= pause_ <= nominal * 1.2
    assert not state.exists()


class SignalOnPrint(io.StringIO):
    """Standard output that receives a SIGTERM while an event's line is being printed."""

    def write(self, text: str) -> int:
        if text.strip():
            signal.raise_signal(signal.SIGTERM)
        return super().write(text)


def test_a_stop_while_printing_waits_until_the_position_is_saved(state: Path) -> None:
    listener = Listener(Options("http://127.0.0.1:1", CHANNEL, TOKEN, state=state), SignalOnPrint(), io.StringIO())
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    listener.signals.install()
    try:
        with pytest.raises(listen.Stopped) as stopped:
            listener.message(
                Message("7", "message", json.dumps({"id": "7", "payload": {}})), Catchup(False, datetime.now(UTC))
            )
        assert stopped.value.signum == signal.SIGTERM
        assert saved(state) == "7"  # printed and saved, then stopped
        with pytest.raises(listen.Stopped):  # and between events a stop is at once
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])


def test_bad_urls_are_fatal(state: Path) -> None:
    with pytest.raises(listen.Fatal, match="--url"):
        Listener(Options("ftp://example.com", CHANNEL, TOKEN, state=state))
    with pytest.raises(listen.Fatal, match="--forward"):
        Listener(Options("http://example.com", CHANNEL, TOKEN, forward="localhost:3000", state=state))


# --------------------------------------------------------------------------- units


def feed(lines: list[str]) -> list[Message]:
    parser = SSEParser()
    return [m for m in (parser.feed(line) for line in lines) if m is not None]


def test_the_parser_reads_messages_and_skips_comments() -> None:
    lines = [": heartbeat\n", "\n", "id: 12\n", "event: message\n", 'data: {"a": 1}\n', "\n"]
    lines += ["data:first\r\n", "data: second\r\n", "\r\n", "event: reset\n", 'data: {"type": "reset"}\n', "\n"]
    assert feed(lines) == [
        Message("12", "message", '{"a": 1}'),
        Message(None, "message", "first\nsecond"),
        Message(None, "reset", '{"type": "reset"}'),
    ]


def test_the_parser_ignores_a_message_without_data_and_unknown_fields() -> None:
    assert feed(["id: 3\n", "\n", "retry: 100\n", "weird\n", "data: x\n", "\n"]) == [Message(None, "message", "x")]


def test_backoff_doubles_to_the_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(rng=random.Random(1))
    delays = [backoff.next() for _ in range(10)]
    for delay, nominal in zip(delays, (0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30), strict=True):
        assert nominal * 0.8 <= delay <= nominal * 1.2
    assert len({round(d, 6) for d in delays[6:]}) == 4  # jittered, not all alike
    backoff.reset()
    assert 0.4 <= backoff.next() <= 0.6
    assert 8 <= Backoff().next(at_least=10) <= 12


def test_the_default_state_file_is_one_per_url_channel_and_forward(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    path = listen.default_state_path("https://hooks.example.com/", "alerts", None)
    assert path.parent == tmp_path / "state" / "webhook-server"
    assert path == listen.default_state_path("https://hooks.example.com", "alerts", None)
    others = {
        listen.default_state_path("https://other.example.com", "alerts", None),
        listen.default_state_path("https://hooks.example.com", "builds", None),
        listen.default_state_path("https://hooks.example.com", "alerts", "http://localhost:3000/hook"),
    }
    assert len(others | {path}) == 4
    monkeypatch.setenv("XDG_STATE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert listen.state_directory() == tmp_path / "home" / ".local" / "state" / "webhook-server"


def test_the_state_file_round_trips_and_holds_no_token(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "state.json"
    assert listen.load_cursor(path) is None
    listen.save_cursor(path, Options("http://x", CHANNEL, TOKEN), "41")
    listen.save_cursor(path, Options("http://x", CHANNEL, TOKEN), "42")
    assert listen.load_cursor(path) == "42"
    assert TOKEN not in path.read_text()
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]
    path.write_text("{broken")
    with pytest.raises(listen.Fatal, match="state file"):
        listen.load_cursor(path)


def test_the_default_state_file_is_used_by_the_command(
    server: StreamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    child = Listen(CHANNEL, "--url", server.url, "--token", TOKEN)
    try:
        child.wait_for_stderr("connected to")
        server.add()
        child.wait_for_lines(1)
        path = listen.default_state_path(server.url, CHANNEL, None)
        assert str(path) in child.stderr
        wait_until(lambda: saved(path) == "1")
    finally:
        child.stop()


def test_forward_request_keeps_sender_headers_and_drops_hop_by_hop_ones() -> None:
    event = {
        "id": "9",
        "content_type": "application/x-www-form-urlencoded",
        "headers": [["X-A", "1"], ["Transfer-Encoding", "chunked"], ["X-A", "2"], ["X-Bad", "a\r\nX-Evil: 1"]],
        "body_base64": base64.b64encode(b"a=1&b=2").decode(),
    }
    body, headers = listen.forward_request(event)
    assert body == b"a=1&b=2"
    assert headers == [
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("X-A", "1"),
        ("X-A", "2"),
        ("X-Webhook-Event-Id", "9"),
    ]


def test_a_printed_line_has_no_control_characters() -> None:
    event = {"id": "1", "source": "s", "event": "\x1b[31mred", "device": "d\x9b", "payload": "x" * 500}
    line = listen.format_event(event)
    assert "\x1b" not in line and "\x9b" not in line
    assert line.endswith("...") and len(line) < 260


def test_catchup_counts_events_older_than_the_connection() -> None:
    now = datetime.now(UTC)
    catchup = Catchup(True, now)
    old = (now - timedelta(seconds=5)).isoformat()
    assert not catchup.heartbeat()  # a greeting before the backlog
    assert [catchup.event(old), catchup.event(old), catchup.event(now.isoformat())] == [False, False, True]
    assert catchup.count == 2 and not catchup.event(old)
    fresh = Catchup(False, now)
    assert not fresh.event(old) and not fresh.heartbeat()


def test_retry_after_reads_seconds() -> None:
    assert listen.retry_after("3") == 3.0
    assert listen.retry_after(None) is None
    assert listen.retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
