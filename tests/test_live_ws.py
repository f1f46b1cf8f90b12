"""`GET /ws/<channel>`: the live stream over WebSocket, against a real `webhook-server serve`
(Gunicorn gthread, 2 workers) with the `websockets` client; and the connection's keepalive on
a socket pair, with short intervals."""

from __future__ import annotations

import base64
import json
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.sync.client import ClientConnection, connect
from websockets.uri import parse_uri

from tests.conftest import PARTICLE_SECRET, WEBHOOK_SECRET, hub_signature, particle_event
from tests.server import Server
from webhook_server.live import websocket as ws_module
from webhook_server.live.stream import Item

ALL_TOKEN = "ws-all-Qm7x-never-logged-91kd"
GENERIC_TOKEN = "ws-generic-Zp3v-never-logged-4hs"
TOKENS = f"{ALL_TOKEN}:*,{GENERIC_TOKEN}:generic"


def server_env(work: Path) -> dict[str, Any]:
    return {
        "PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "SUBSCRIBER_TOKENS": TOKENS,
        "DATA_DIR": work / "data",
        "RATE_LIMIT": "100000/second",
        "WEB_CONCURRENCY": 2,
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("ws")
    with Server(server_env(work), work) as running:
        yield running


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Server]:
    """A server of the test's own, for what changes the store or stops the server."""
    with Server(server_env(tmp_path), tmp_path) as running:
        yield running


# -- helpers


def post_generic(server: Server, n: int, session: Any = requests, pad: int = 0) -> int:
    payload: dict[str, Any] = {"event": "deploy", "n": n}
    if pad:
        payload["pad"] = "x" * pad
    body = json.dumps(payload).encode()
    response = session.post(
        f"{server.url}/webhook",
        data=body,
        headers={"Content-Type": "application/json", "X-Hub-Signature-256": hub_signature(body)},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    return int(response.json()["id"])


def post_particle(server: Server, n: int) -> int:
    response = requests.post(
        f"{server.url}/webhook/particle",
        json=particle_event(data=f"hall {n}"),
        headers={"Authorization": f"Bearer {PARTICLE_SECRET}"},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    return int(response.json()["id"])


def newest(server: Server) -> int:
    """A cursor for "what comes after now": the id of an event posted for it."""
    return post_generic(server, -1)


def ws_url(server: Server, channels: str, **query: Any) -> str:
    text = "&".join(f"{k}={v}" for k, v in query.items())
    return f"ws://127.0.0.1:{server.port}/ws/{channels}" + (f"?{text}" if text else "")


def subscribe(server: Server, channels: str, token: str | None = ALL_TOKEN, **kwargs: Any) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    query = kwargs.pop("query", {})
    kwargs.setdefault("ping_interval", None)
    kwargs.setdefault("open_timeout", 10)
    return connect(ws_url(server, channels, **query), additional_headers=headers, **kwargs)


def receive(ws: ClientConnection, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    messages = []
    while len(messages) < count:
        messages.append(json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.01))))
    return messages


def ids(messages: list[dict[str, Any]]) -> list[int]:
    return [int(m["id"]) for m in messages]


def assert_quiet(ws: ClientConnection, seconds: float = 0.5) -> None:
    with pytest.raises(TimeoutError):
        ws.recv(timeout=seconds)


def refusal(server: Server, path: str, headers: dict[str, str] | None = None) -> Any:
    url = f"ws://127.0.0.1:{server.port}{path}"
    with pytest.raises(InvalidStatus) as caught, connect(url, additional_headers=headers, open_timeout=10):
        pass
    response = caught.value.response
    assert response.headers["Content-Type"] == "application/json"
    return response.status_code, json.loads(response.body)


# -- the stream


def test_two_subscribers_each_get_every_event_in_order(server: Server) -> None:
    since = newest(server)
    with (
        subscribe(server, "generic", query={"since": since}) as first,
        subscribe(server, "generic", GENERIC_TOKEN, query={"since": since}) as second,
    ):
        posted = [post_generic(server, n) for n in range(10)]
        for ws in (first, second):
            messages = receive(ws, 10)
            assert ids(messages) == posted
            assert [m["payload"]["n"] for m in messages] == list(range(10))
            assert set(messages[0]) == {"id", "source", "received_at", "event", "device", "payload"}
            assert messages[0]["source"] == "generic" and messages[0]["event"] == "deploy"
            assert_quiet(ws, 0.3)


def test_new_events_only_without_a_cursor(server: Server) -> None:
    with subscribe(server, "generic") as ws:
        time.sleep(0.5)  # the subscription starts once the 101 is sent: let it
        posted = post_generic(server, 1)
        assert ids(receive(ws, 1)) == [posted]


def test_star_and_a_comma_list(server: Server) -> None:
    since = newest(server)
    with (
        subscribe(server, "*", query={"since": since}) as everything,
        subscribe(server, "generic,particle", query={"since": since}) as listed,
        subscribe(server, "*", GENERIC_TOKEN, query={"since": since}) as generic_only,
    ):
        posted = [post_particle(server, 1), post_generic(server, 2), post_particle(server, 3), post_generic(server, 4)]
        for ws in (everything, listed):
            messages = receive(ws, 4)
            assert ids(messages) == posted
            assert [m["source"] for m in messages] == ["particle", "generic", "particle", "generic"]
        assert ids(receive(generic_only, 2)) == [posted[1], posted[3]]
        assert_quiet(generic_only, 0.3)


def test_raw_adds_what_was_received(server: Server) -> None:
    since = newest(server)
    posted = post_generic(server, 7)
    with subscribe(server, "generic", query={"since": since, "raw": 1}) as ws:
        (message,) = receive(ws, 1)
    assert int(message["id"]) == posted
    assert message["content_type"] == "application/json"
    assert json.loads(base64.b64decode(message["body_base64"])) == {"event": "deploy", "n": 7}
    assert isinstance(message["headers"], list)


def test_since_resumes_with_exactly_the_missed_events(server: Server) -> None:
    since = newest(server)
    with subscribe(server, "generic", query={"since": since}) as ws:
        first = [post_generic(server, n) for n in range(3)]
        got = receive(ws, 3)
    assert ids(got) == first
    missed = [post_generic(server, n) for n in range(3, 8)]
    with subscribe(server, "generic", query={"since": got[-1]["id"]}) as ws:
        assert ids(receive(ws, 5)) == missed
        assert_quiet(ws, 0.3)
        later = post_generic(server, 9)
        assert ids(receive(ws, 1)) == [later]


def test_two_hundred_events_at_concurrency_20_arrive_in_order(server: Server) -> None:
    since = newest(server)
    with subscribe(server, "*", query={"since": since}) as ws, requests.Session() as session:
        session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=20, pool_maxsize=20))
        with ThreadPoolExecutor(20) as pool:
            posted = list(pool.map(lambda n: post_generic(server, n, session), range(200)))
        got = ids(receive(ws, 200, timeout=30))
    assert got == sorted(posted)


def test_a_slow_subscriber_is_closed_with_1013_and_loses_nothing(server: Server) -> None:
    """The slow client's socket takes little and its client stops reading; events go on (32 KB
    each: the kernel buffers hold about 120 of them here), its hub buffer (1,000) overflows."""
    total, pad = 1400, 32 * 1024
    since = newest(server)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect(("127.0.0.1", server.port))
    with (
        subscribe(server, "generic", query={"since": since}) as fast,
        connect(
            ws_url(server, "generic", since=since),
            sock=sock,
            additional_headers={"Authorization": f"Bearer {ALL_TOKEN}"},
            max_queue=1,
            ping_interval=None,
        ) as slow,
    ):
        fast_got: list[int] = []
        reader = threading.Thread(target=lambda: fast_got.extend(ids(receive(fast, total, timeout=120))))
        reader.start()
        with requests.Session() as session:
            session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=20, pool_maxsize=20))
            with ThreadPoolExecutor(20) as pool:
                posted = sorted(pool.map(lambda n: post_generic(server, n, session, pad), range(total)))
        reader.join(timeout=120)
        assert fast_got == posted  # the fast one is not held back by the slow one
        slow_got: list[int] = []
        with pytest.raises(ConnectionClosed):
            while True:
                slow_got.append(int(json.loads(slow.recv(timeout=20))["id"]))
        assert slow.close_code == 1013
        assert "1000 events" in (slow.close_reason or "")
    print(f"the slow subscriber got {len(slow_got)} of {total} before its 1013")
    assert 0 < len(slow_got) < total
    assert slow_got == posted[: len(slow_got)]
    with subscribe(server, "generic", query={"since": slow_got[-1]}, max_size=None) as again:
        rest = ids(receive(again, total - len(slow_got), timeout=60))
    assert slow_got + rest == posted


def test_client_pings_are_answered(server: Server) -> None:
    since = newest(server)
    with subscribe(server, "generic", query={"since": since}, ping_interval=0.3, ping_timeout=3) as ws:
        time.sleep(4)  # idle: a pong that came later than 3 s would have closed it (1011)
        assert ws.protocol.state is State.OPEN
        assert ws.ping(b"direct").wait(timeout=3)
        posted = post_generic(server, 1)
        assert ids(receive(ws, 1)) == [posted]


def test_the_client_closing_ends_the_stream_quickly(server: Server) -> None:
    ws = subscribe(server, "generic", close_timeout=5)
    with ws:
        time.sleep(0.3)
    started = time.monotonic()
    ws.close()
    assert ws.close_code == 1000
    assert time.monotonic() - started < 3


# -- refusals, before the upgrade


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/ws/generic", None, 401),
        ("/ws/generic", {"Authorization": "Bearer wrong-token-0123456789abcdef"}, 401),
        (f"/ws/generic?token=wrong-{ALL_TOKEN}", None, 401),
        ("/ws/particle", {"Authorization": f"Bearer {PARTICLE_SECRET}"}, 401),
        (f"/ws/generic?token={WEBHOOK_SECRET.replace(' ', '%20')}", None, 401),
        ("/ws/particle", {"Authorization": f"Bearer {GENERIC_TOKEN}"}, 403),
        ("/ws/generic,particle", {"Authorization": f"Bearer {GENERIC_TOKEN}"}, 403),
        ("/ws/nosuch", {"Authorization": f"Bearer {ALL_TOKEN}"}, 404),
        ("/ws/generic,nosuch", {"Authorization": f"Bearer {ALL_TOKEN}"}, 404),
        ("/ws/generic?since=abc", {"Authorization": f"Bearer {ALL_TOKEN}"}, 400),
    ],
)
def test_each_refusal(server: Server, path: str, headers: dict[str, str] | None, status: int) -> None:
    got, body = refusal(server, path, headers)
    assert got == status
    assert set(body) >= {"error", "message"}


def test_a_plain_get_gets_the_same_checks_then_426(server: Server) -> None:
    assert requests.get(f"{server.url}/ws/generic", timeout=5).status_code == 401
    answer = requests.get(f"{server.url}/ws/generic?token={ALL_TOKEN}", timeout=5)
    assert answer.status_code == 426
    assert answer.headers["Upgrade"] == "websocket"
    assert answer.json()["error"] == "upgrade_required"


def test_the_token_as_query_and_never_in_the_log(server: Server) -> None:
    since = newest(server)
    with subscribe(server, "generic", token=None, query={"since": since, "token": GENERIC_TOKEN}) as ws:
        posted = post_generic(server, 1)
        assert ids(receive(ws, 1)) == [posted]
    refusal(server, f"/ws/particle?token={GENERIC_TOKEN}")
    time.sleep(0.5)  # log lines are written in batches
    log = server.output()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    upgrades = [line for line in lines if line.get("path") == "/ws/generic" and line.get("status") == 101]
    assert upgrades and all(line["logger"] == "webhook_server.access" for line in upgrades)
    for token in (ALL_TOKEN, GENERIC_TOKEN):
        assert token not in log
    assert "Traceback" not in log and '"level": "error"' not in log


# -- the store and the server


def test_reset_when_the_cursor_is_older_than_what_is_kept(own_server: Server) -> None:
    posted = [post_generic(own_server, n) for n in range(5)]
    database = own_server.workdir / "data" / "webhooks.sqlite3"
    with sqlite3.connect(database) as db:  # retention: the three oldest are gone
        db.execute("DELETE FROM deliveries WHERE event_id <= ?", (posted[2],))
        db.execute("DELETE FROM events WHERE id <= ?", (posted[2],))
    db.close()
    with subscribe(own_server, "generic", query={"since": posted[0]}) as ws:
        messages = [json.loads(ws.recv(timeout=10)) for _ in range(3)]
    assert messages[0] == {"type": "reset", "oldest": str(posted[3])}
    assert ids(messages[1:]) == posted[3:]
    with subscribe(own_server, "generic", query={"since": 10**12}) as ws:  # newer than anything: a new store
        assert json.loads(ws.recv(timeout=10)) == {"type": "reset", "oldest": str(posted[3])}
        assert ids(receive(ws, 2)) == posted[3:]
    with subscribe(own_server, "generic", query={"since": posted[2]}) as ws:  # just before the oldest: no reset
        assert ids(receive(ws, 2)) == posted[3:]


def test_a_stop_closes_streams_with_1001_quickly(own_server: Server) -> None:
    since = newest(own_server)
    with subscribe(own_server, "*", query={"since": since}) as first, subscribe(own_server, "generic") as second:
        time.sleep(0.3)
        started = time.monotonic()
        own_server.stop()
        assert time.monotonic() - started < 5
        for ws in (first, second):
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
            assert ws.close_code == 1001


def test_streams_beyond_the_process_capacity_get_503_before_the_upgrade(tmp_path: Path) -> None:
    env = {**server_env(tmp_path), "WEB_CONCURRENCY": 1, "GUNICORN_THREADS": 9}  # one stream place
    with Server(env, tmp_path) as one, subscribe(one, "generic") as holder:
        time.sleep(0.3)
        status, body = refusal(one, f"/ws/generic?token={ALL_TOKEN}")
        assert (status, body["error"]) == (503, "unavailable")
        holder.close()
        time.sleep(0.3)  # the place is given back once the connection is over
        with subscribe(one, "generic") as again:
            assert again.protocol.state is State.OPEN


# -- keepalive, on a socket pair


def handshake(server_sock: socket.socket, client_sock: socket.socket) -> tuple[ws_module.Connection, ClientProtocol]:
    """An accepted WebSocket: the server side as the view makes it, the client side sans-I/O."""
    client = ClientProtocol(parse_uri("ws://test/ws/a"))
    client.send_request(client.connect())
    client_sock.sendall(b"".join(client.data_to_send()))
    accepting = ServerProtocol()
    while not (requests_in := accepting.events_received()):
        accepting.receive_data(server_sock.recv(65536))
    handshake_response = accepting.accept(requests_in[0])
    connection = ws_module.Connection(
        server_sock,
        ServerProtocol(state=State.OPEN),
        ping_seconds=0.2,
        pong_seconds=0.6,
        service_stopping=lambda: False,
    )
    connection.open(handshake_response, accepting)
    while client.state is not State.OPEN:
        client.receive_data(client_sock.recv(65536))
    return connection, client


def idle(stop: Callable[[], bool]) -> Iterator[Item]:
    while not stop():
        time.sleep(0.05)
    yield from ()


def run_in_thread(connection: ws_module.Connection) -> threading.Thread:
    thread = threading.Thread(target=connection.run, args=(idle, False), daemon=True)
    thread.start()
    return thread


def test_idle_streams_get_pings_and_a_client_that_answers_stays() -> None:
    server_sock, client_sock = socket.socketpair()
    connection, client = handshake(server_sock, client_sock)
    thread = run_in_thread(connection)
    pings = 0
    client_sock.settimeout(0.1)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            client.receive_data(client_sock.recv(65536))
        except TimeoutError:
            continue
        pings += sum(1 for e in client.events_received() if isinstance(e, Frame) and e.opcode is Opcode.PING)
        client_sock.sendall(b"".join(client.data_to_send()))  # the pongs
    assert pings >= 5
    assert thread.is_alive()
    client.send_close(1000)
    client_sock.sendall(b"".join(client.data_to_send()))
    thread.join(timeout=3)
    assert not thread.is_alive()
    client_sock.settimeout(2)
    while (data := client_sock.recv(65536)) != b"":
        client.receive_data(data)
    assert client.close_rcvd is not None and client.close_rcvd.code == 1000


def test_a_client_that_stops_answering_pings_is_reaped() -> None:
    server_sock, client_sock = socket.socketpair()
    connection, _client = handshake(server_sock, client_sock)
    started = time.monotonic()
    thread = run_in_thread(connection)
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert 0.6 < time.monotonic() - started < 3
    assert connection.dead
    client_sock.settimeout(2)
    while client_sock.recv(65536):  # the pings it never answered, then the end
        pass
