"""The live stream end to end: a real `webhook-server serve` (Gunicorn, 2 workers), real streaming
HTTP clients for `GET /events/<channel>`, and the real `webhook-server listen --forward` with a
local app that checks the sender's signature, across a server restart and a local-app outage."""

from __future__ import annotations

import contextlib
import hmac
import http.client
import json
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from tests.conftest import CORE_ID, PARTICLE_SECRET, WEBHOOK_SECRET, assert_accepted, signed_headers
from tests.server import Server

pytestmark = pytest.mark.e2e

TOKEN_ALL = "sub-token-0123456789abcdef"  # opens every channel
TOKEN_PARTICLE = "particle-token-0123456789"  # opens particle only
WRONG_TOKEN = "not-a-token-0123456789abc"
MAX_PAYLOAD = 200_000


def server_env(data_dir: Path) -> dict[str, Any]:
    return {
        "PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "SUBSCRIBER_TOKENS": f"{TOKEN_ALL}:*,{TOKEN_PARTICLE}:particle",
        "DATA_DIR": data_dir,
        "RATE_LIMIT": "100000/second",
        "MAX_PAYLOAD_BYTES": MAX_PAYLOAD,
        "WEB_CONCURRENCY": 2,
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("live")
    with Server(server_env(work / "data"), work) as running:
        yield running


# --------------------------------------------------------------------------- senders


_local = threading.local()


def session() -> requests.Session:
    """One keep-alive session per thread."""
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
    current: requests.Session = _local.session
    return current


def github_body(n: int, pad: int = 0) -> bytes:
    """A JSON body with odd spacing and non-ASCII text, so a re-encoded copy would differ."""
    text = json.dumps({"n": n, "ref": "refs/heads/main", "who": "Zoë ✓", "pad": "x" * pad}, ensure_ascii=False)
    return text.replace(", ", ",  ").encode()


def post_generic(server: Server, n: int, pad: int = 0) -> str:
    """A GitHub-style delivery to POST /webhook (the generic source); its event id."""
    body = github_body(n, pad)
    headers = signed_headers(body, **{"X-GitHub-Event": "push", "X-GitHub-Delivery": str(uuid.uuid4())})
    return assert_accepted(session().post(f"{server.url}/webhook", data=body, headers=headers, timeout=30))


def post_particle(server: Server, n: int) -> str:
    form = {"event": "motion", "data": f"e2e-{uuid.uuid4()}-{n}", "coreid": CORE_ID}
    form["published_at"] = "2026-11-23T18:02:11.000Z"
    headers = {"Authorization": f"Bearer {PARTICLE_SECRET}"}
    return assert_accepted(session().post(f"{server.url}/webhook/particle", data=form, headers=headers, timeout=30))


# --------------------------------------------------------------------------- a streaming client


@dataclass(frozen=True)
class Message:
    id: str | None
    event: str
    data: str

    @property
    def document(self) -> Any:
        return json.loads(self.data)


class Stream:
    """One `GET /events/...` over http.client, parsed as text/event-stream by its own thread."""

    def __init__(
        self, server: Server, path: str, headers: dict[str, str] | None = None, rcvbuf: int | None = None
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:  # set before connecting: a small window, so the server's writes block soon
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", server.port))
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        self.conn.sock = self.sock
        self.conn.request("GET", path, headers={"Accept": "text/event-stream", **(headers or {})})
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.messages: list[Message] = []
        self.comments: list[str] = []
        self.live = threading.Event()  # the backlog was sent (the `: live` comment)
        self.ended = threading.Event()  # the server ended the stream
        self.changed = threading.Condition()
        self._parts: dict[str, Any] = {"id": None, "event": "message", "data": []}
        self._thread: threading.Thread | None = None

    def body(self) -> bytes:
        return self.response.read()

    def read_line(self) -> bool:
        """Read and parse one line; False at the end of the stream."""
        raw = self.response.readline()
        if not raw:
            return False
        line = raw.decode().rstrip("\r\n")
        parts = self._parts
        if not line:
            if parts["data"]:
                with self.changed:
                    self.messages.append(Message(parts["id"], parts["event"], "\n".join(parts["data"])))
                    self.changed.notify_all()
            self._parts = {"id": None, "event": "message", "data": []}
        elif line.startswith(":"):
            self.comments.append(line)
            if line == ": live":
                self.live.set()
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                parts["data"].append(value)
            elif name in ("id", "event"):
                parts[name] = value
        return True

    def until_live(self, timeout: float = 10.0) -> Stream:
        """Read in this thread until the backlog is sent (the subscriber is registered by then)."""
        deadline = time.monotonic() + timeout
        while not self.live.is_set():
            assert time.monotonic() < deadline, "no `: live` from the stream"
            assert self.read_line(), "the stream ended before `: live`"
        return self

    def start(self) -> Stream:
        """Go on reading in a thread of its own."""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while self.read_line():
                pass
        except (OSError, http.client.HTTPException, ValueError):
            pass  # a connection we hung up, or that broke
        finally:
            with self.changed:
                self.ended.set()
                self.changed.notify_all()

    def wait_for(self, condition: Callable[[list[Message]], bool], timeout: float = 15.0) -> list[Message]:
        with self.changed:
            if not self.changed.wait_for(lambda: condition(self.messages) or self.ended.is_set(), timeout):
                raise AssertionError(f"timed out: {len(self.messages)} messages so far")
            assert condition(self.messages), f"the stream ended after {len(self.messages)} messages"
            return list(self.messages)

    def wait_events(self, count: int, timeout: float = 15.0) -> list[Message]:
        """The first `count` event messages (fails on anything else before them)."""
        messages = self.wait_for(lambda ms: len(ms) >= count, timeout)
        return messages[:count]

    def ids(self) -> list[str]:
        with self.changed:
            return [m.id or "" for m in self.messages if m.event == "message"]

    def close(self) -> None:
        """Hang up: the reader thread sees the end and stops before the connection is closed."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.conn.close()
        self.sock.close()


def subscribe(server: Server, channel: str, token: str = TOKEN_ALL, query: str = "", **kw: Any) -> Stream:
    """A registered subscriber (its backlog, if any, read up to `: live`), read by its own thread."""
    stream = Stream(server, f"/events/{channel}?token={token}{query}", **kw)
    assert stream.status == 200, stream.body()
    assert stream.response.getheader("Content-Type", "").startswith("text/event-stream")
    return stream.until_live().start()


def event_ids(messages: list[Message]) -> list[str]:
    assert all(m.event == "message" for m in messages), [m.event for m in messages]
    for m in messages:
        assert m.document["id"] == m.id
    return [m.id or "" for m in messages]


def quiet(stream: Stream, seconds: float = 0.3) -> None:
    """Nothing more arrives for a moment."""
    before = len(stream.messages)
    time.sleep(seconds)
    assert len(stream.messages) == before, stream.messages[before:]


# --------------------------------------------------------------------------- the stream


def test_two_subscribers_each_get_all_events_in_order(server: Server) -> None:
    first, second = subscribe(server, "generic"), subscribe(server, "generic", query="&raw=1")
    try:
        posted = [post_generic(server, n) for n in range(10)]
        assert posted == sorted(posted, key=int)
        for stream in (first, second):
            messages = stream.wait_events(10)
            assert event_ids(messages) == posted
        plain, raw = first.messages[0].document, second.messages[0].document
        assert plain["source"] == "generic" and plain["event"] == "push" and plain["payload"]["n"] == 0
        assert "body_base64" not in plain
        assert raw["content_type"] == "application/json"
        quiet(first)
    finally:
        first.close()
        second.close()


def test_star_and_a_comma_list_take_every_channel_the_token_opens(server: Server) -> None:
    star = subscribe(server, "*")
    listed = subscribe(server, "particle,generic")
    particle_only = subscribe(server, "particle", token=TOKEN_PARTICLE)
    try:
        posted = [post_particle(server, 0), post_generic(server, 1), post_particle(server, 2), post_generic(server, 3)]
        for stream in (star, listed):
            messages = stream.wait_events(4)
            assert event_ids(messages) == posted
            assert [m.document["source"] for m in messages] == ["particle", "generic"] * 2
        assert event_ids(particle_only.wait_events(2)) == [posted[0], posted[2]]
        quiet(particle_only)
    finally:
        for stream in (star, listed, particle_only):
            stream.close()


@pytest.mark.parametrize(
    ("path", "headers", "status", "error"),
    [
        ("/events/generic", {}, 401, "unauthorized"),
        (f"/events/generic?token={WRONG_TOKEN}", {}, 401, "unauthorized"),
        ("/events/generic", {"Authorization": f"Bearer {WRONG_TOKEN}"}, 401, "unauthorized"),
        ("/events/particle", {"Authorization": f"Bearer {PARTICLE_SECRET}"}, 401, "unauthorized"),
        (f"/events/generic?token={quote(WEBHOOK_SECRET)}", {}, 401, "unauthorized"),
        (f"/events/generic?token={TOKEN_PARTICLE}", {}, 403, "forbidden"),
        (f"/events/particle,generic?token={TOKEN_PARTICLE}", {}, 403, "forbidden"),
        (f"/events/nope?token={TOKEN_ALL}", {}, 404, "not_found"),
        (f"/events/particle,nope?token={TOKEN_ALL}", {}, 404, "not_found"),
        (f"/events/generic?token={TOKEN_ALL}", {"Last-Event-ID": "abc"}, 400, None),
        (f"/events/generic?token={TOKEN_ALL}&since=-1", {}, 400, None),
        (f"/events/generic?token={TOKEN_ALL}", {"Last-Event-ID": "1" * 20}, 400, None),
    ],
)
def test_refusals_are_json_before_any_stream(
    server: Server, path: str, headers: dict[str, str], status: int, error: str | None
) -> None:
    response = requests.get(server.url + path, headers=headers, timeout=5, stream=True)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "message"}, body
    if error:
        assert body["error"] == error
    if status == 401:
        assert response.headers.get("WWW-Authenticate")


def test_last_event_id_and_since_resume_with_exactly_the_missed_events(server: Server) -> None:
    posted = [post_generic(server, n) for n in range(6)]
    by_header = subscribe(server, "generic", headers={"Last-Event-ID": posted[1]})
    by_query = subscribe(server, "generic", query=f"&since={posted[3]}")
    try:
        assert event_ids(by_header.wait_events(4)) == posted[2:]
        assert event_ids(by_query.wait_events(2)) == posted[4:]
        quiet(by_header, 0.2)
        later = post_generic(server, 6)  # the live tail follows the backlog, with no gap or repeat
        assert event_ids(by_header.wait_events(5)) == [*posted[2:], later]
        assert event_ids(by_query.wait_events(3)) == [*posted[4:], later]
        quiet(by_query, 0.2)
    finally:
        by_header.close()
        by_query.close()


def test_poll_sends_the_stored_events_after_the_cursor_and_closes(server: Server) -> None:
    posted = [post_generic(server, n) for n in range(4)]
    response = requests.get(
        f"{server.url}/events/generic", params={"token": TOKEN_ALL, "since": posted[0], "poll": "1"}, timeout=5
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    frames = [block for block in response.text.split("\n\n") if block.strip()]
    ids = [line.removeprefix("id: ") for block in frames for line in block.splitlines() if line.startswith("id: ")]
    assert ids == posted[1:]
    assert all("event: message" in block for block in frames)
    nothing = requests.get(
        f"{server.url}/events/generic", params={"token": TOKEN_ALL, "since": posted[-1], "poll": "1"}, timeout=5
    )
    assert nothing.status_code == 200 and "id:" not in nothing.text


def delete_events_up_to(data_dir: Path, last: int) -> None:
    """What retention will do: the oldest rows (and their deliveries) go."""
    with sqlite3.connect(data_dir / "webhooks.sqlite3", timeout=10) as conn:
        conn.execute("DELETE FROM deliveries WHERE event_id <= ?", (last,))
        conn.execute("DELETE FROM events WHERE id <= ?", (last,))
    conn.close()


def test_reset_when_the_cursor_is_older_than_kept_or_newer_than_accepted(server: Server) -> None:
    posted = [post_generic(server, n) for n in range(6)]
    time.sleep(0.5)  # let the delivery worker dispatch them first
    delete_events_up_to(Path(server.env["DATA_DIR"]), int(posted[3]))
    stale = subscribe(server, "generic", headers={"Last-Event-ID": posted[1]})
    try:
        messages = stale.wait_events(3)
        assert messages[0].event == "reset" and messages[0].id is None
        assert json.loads(messages[0].data) == {"type": "reset", "oldest": posted[4]}
        assert event_ids(messages[1:]) == posted[4:]
    finally:
        stale.close()
    # A cursor the server never gave (the store was replaced): reset to the oldest kept.
    future = subscribe(server, "generic", query=f"&since={int(posted[-1]) + 1000}")
    try:
        messages = future.wait_events(3)
        assert messages[0].event == "reset" and json.loads(messages[0].data)["oldest"] == posted[4]
        assert event_ids(messages[1:]) == posted[4:]
        later = post_generic(server, 7)
        assert event_ids(future.wait_events(4)[1:]) == [*posted[4:], later]
    finally:
        future.close()


def test_200_concurrent_posts_reach_a_subscriber_in_order_once(server: Server) -> None:
    stream = subscribe(server, "generic")
    try:
        with ThreadPoolExecutor(20) as pool:
            posted = list(pool.map(lambda n: post_generic(server, n), range(200)))
        assert len(set(posted)) == 200
        ids = event_ids(stream.wait_events(200, timeout=30))
        assert ids == sorted(posted, key=int)
        quiet(stream)
    finally:
        stream.close()


def test_a_subscriber_that_stops_reading_overflows_while_a_fast_one_gets_everything(server: Server) -> None:
    # 1,000 events wait for a subscriber at most. The slow one's socket buffers (a small receive
    # window on our side; the server's send buffer grows to net.ipv4.tcp_wmem's 4 MB at most)
    # hold ~4 MB more, so 1,300 events of 32 KB are past both.
    count, pad = 1300, 32_000
    fast = subscribe(server, "generic")
    slow = Stream(server, f"/events/generic?token={TOKEN_ALL}", rcvbuf=4096).until_live()  # and reads no more
    try:
        with ThreadPoolExecutor(6) as pool:
            posted = list(pool.map(lambda n: post_generic(server, n, pad), range(count)))
        posted.sort(key=int)
        assert event_ids(fast.wait_events(count, timeout=60)) == posted
        assert len(fast.messages[-1].document["payload"]["pad"]) == pad
        slow.start()  # reading again: what was in the buffers, then the overflow, then the end
        assert slow.ended.wait(20), f"the slow stream did not end ({len(slow.messages)} messages)"
        *events, last = slow.messages
        assert last.event == "overflow" and json.loads(last.data)["type"] == "overflow", last
        got = event_ids(events)
        assert got == posted[: len(got)] and len(got) < count - 1000
        # It resumes from its last id, out of the store, with nothing missed.
        resumed = subscribe(server, "generic", headers={"Last-Event-ID": got[-1] if got else posted[0]})
        try:
            missed = posted[len(got) :] if got else posted[1:]
            assert event_ids(resumed.wait_events(len(missed), timeout=30)) == missed
            quiet(resumed, 0.2)
        finally:
            resumed.close()
        assert not fast.ended.is_set()
        assert fast.ids() == posted
    finally:
        fast.close()
        slow.close()


def test_the_token_never_appears_in_the_server_log(server: Server) -> None:
    for token in (TOKEN_ALL, TOKEN_PARTICLE, WRONG_TOKEN):
        for channel in ("generic", "particle"):
            requests.get(f"{server.url}/events/{channel}?token={token}&poll=1&since=1", timeout=5)
    stream = subscribe(server, "particle", token=TOKEN_PARTICLE)
    post_particle(server, 1)
    stream.wait_events(1)
    stream.close()
    time.sleep(0.5)  # the log lines are written in batches
    log = server.output()
    assert "/events/particle" in log  # the requests are logged, without their query
    for secret in (TOKEN_ALL, TOKEN_PARTICLE, WRONG_TOKEN):
        assert secret not in log


# --------------------------------------------------------------------------- listen --forward


class LocalApp:
    """The app `listen --forward` posts to: checks the GitHub signature, records, answers `status`."""

    def __init__(self, port: int = 0) -> None:
        self.received: list[dict[str, Any]] = []
        self.refused = 0  # requests answered 503 while "unavailable"
        self.status = 200
        self.lock = threading.Lock()
        self._serve(port)

    def _serve(self, port: int) -> None:
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, "sha256").hexdigest()
                with app.lock:
                    status = app.status
                    if status == 200:
                        app.received.append(
                            {
                                "id": self.headers.get("X-Webhook-Event-Id"),
                                "body": body,
                                "headers": dict(self.headers.items()),
                                "signed": hmac.compare_digest(expected, self.headers.get("X-Hub-Signature-256", "")),
                            }
                        )
                    else:
                        app.refused += 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.http = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.http.daemon_threads = True
        self.port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True).start()

    def down(self) -> None:
        self.http.shutdown()
        self.http.server_close()

    def up(self) -> None:
        self._serve(self.port)

    def ids(self) -> list[str]:
        with self.lock:
            return [r["id"] for r in self.received]

    def wait_for(self, ids: list[str], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.ids()) >= len(ids):
                break
            time.sleep(0.05)
        assert self.ids() == ids


def test_listen_forward_survives_a_restart_and_an_app_outage_without_loss_or_repeat(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    serve = Server(server_env(data_dir), tmp_path).start()
    app = LocalApp()
    bodies: dict[str, bytes] = {}
    sent_headers: dict[str, dict[str, str]] = {}
    n = 0

    def send(count: int) -> list[str]:
        nonlocal n
        ids = []
        for _ in range(count):
            body = github_body(n)
            headers = signed_headers(body, **{"X-GitHub-Event": "push", "X-GitHub-Delivery": str(uuid.uuid4())})
            event_id = assert_accepted(requests.post(f"{serve.url}/webhook", data=body, headers=headers, timeout=10))
            bodies[event_id], sent_headers[event_id] = body, headers
            ids.append(event_id)
            n += 1
        return ids

    out, err = open(tmp_path / "listen.out", "wb"), open(tmp_path / "listen.err", "wb")  # noqa: SIM115
    command = [sys.executable, "-m", "webhook_server", "listen", "generic", "--url", serve.url, "--token", TOKEN_ALL]
    command += ["--forward", f"http://127.0.0.1:{app.port}/hook", "--state", str(tmp_path / "state.json")]
    listener = subprocess.Popen(command, cwd=tmp_path, env=serve.env, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 10
        while b"connected to" not in (tmp_path / "listen.err").read_bytes():
            assert time.monotonic() < deadline and listener.poll() is None, (tmp_path / "listen.err").read_text()
            time.sleep(0.05)
        time.sleep(0.3)  # `connected` is said once the answer came; the hub registers it meanwhile
        expected = send(5)
        app.wait_for(expected)

        # A stop with subscribers connected (listen and two raw streams) is quick.
        streams = [subscribe(serve, "generic"), subscribe(serve, "*")]
        started = time.monotonic()
        serve.stop()
        stopped = time.monotonic() - started
        assert stopped < 5, f"serve took {stopped:.1f} s to stop with subscribers connected"
        for stream in streams:
            assert stream.ended.wait(5)
            stream.close()

        serve = Server(server_env(data_dir), tmp_path, port=serve.port).start()  # same DATA_DIR and port
        expected += send(5)  # while listen waits to reconnect: these come as its backlog
        app.wait_for(expected)

        with app.lock:
            app.status = 503  # the local app fails for a while: each event is retried until it is taken
        expected += send(3)
        deadline = time.monotonic() + 10
        while app.refused < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        with app.lock:
            app.status = 200
        app.wait_for(expected)

        app.down()  # and is down (connection refused) for a while
        expected += send(3)
        time.sleep(1.0)
        app.up()
        expected += send(2)
        app.wait_for(expected, timeout=30)
        time.sleep(0.5)
        assert app.ids() == expected  # every event, once, in order
        assert app.refused >= 2
    finally:
        listener.terminate()
        listener.wait(timeout=10)
        out.close()
        err.close()
        serve.stop()
        app.down()

    for record in app.received:
        event_id = record["id"]
        assert record["body"] == bodies[event_id]  # byte for byte
        assert record["signed"], f"event {event_id}: the GitHub signature does not verify"
        headers = {k.lower(): v for k, v in record["headers"].items()}
        for name in ("X-GitHub-Event", "X-GitHub-Delivery", "X-Hub-Signature-256", "Content-Type"):
            assert headers[name.lower()] == sent_headers[event_id][name]
        assert headers["x-webhook-event-id"] == event_id
    status = (tmp_path / "listen.err").read_text()
    assert "reconnected to" in status and "not handled" in status
    assert json.loads((tmp_path / "state.json").read_text())["last_id"] == expected[-1]
    assert TOKEN_ALL not in status + (tmp_path / "listen.out").read_text()


def test_a_subscriber_that_hangs_up_gives_its_place_back_at_once(tmp_path: Path) -> None:
    """One place per worker (GUNICORN_THREADS=9 keeps 8 for the webhooks): a client that closes
    must free it within about a second, not at the next heartbeat 15 s later."""
    env = {**server_env(tmp_path / "data"), "WEB_CONCURRENCY": 1, "GUNICORN_THREADS": 9}
    with Server(env, tmp_path) as one_place:
        first = subscribe(one_place, "particle")
        second = Stream(one_place, f"/events/particle?token={TOKEN_ALL}")
        assert second.status == 503 and second.response.getheader("Retry-After")
        second.close()
        first.close()
        deadline = time.monotonic() + 3
        while True:
            again = Stream(one_place, f"/events/particle?token={TOKEN_ALL}")
            if again.status == 200 or time.monotonic() > deadline:
                break
            again.close()
            time.sleep(0.2)
        assert again.status == 200, "the place was not given back within 3 s"
        again.close()
