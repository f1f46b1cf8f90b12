"""The receiver end to end: a real `webhook-server web` (Gunicorn, 2 workers) on a free loopback port."""

from __future__ import annotations

import json
import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests

from tests.conftest import CORE_ID, PARTICLE_SECRET, WEBHOOK_SECRET, assert_accepted, hub_signature
from tests.server import Server

pytestmark = pytest.mark.e2e

GITHUB_VECTOR = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
BEARER = {"Authorization": f"Bearer {PARTICLE_SECRET}"}
LIMIT = 4096


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("receiver")
    env = {
        "PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "DATA_DIR": work / "data",
        "RATE_LIMIT": "100000/second",
        "MAX_PAYLOAD_BYTES": LIMIT,
        "WEB_CONCURRENCY": 2,
    }
    with Server(env, work, command="web") as running:
        yield running


def particle_form(n: int, **fields: str) -> dict[str, str]:
    form = {
        "event": "motion",
        "data": f"hall {n}",
        "coreid": CORE_ID,
        "published_at": "2026-11-23T18:02:11.000Z",
        "fw_version": "42",
        "public": "false",
        "userid": "5f2d0c1e9a8b7c6d5e4f3a2b",
    }
    form.update(fields)
    return form


def raw_request(server: Server, data: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are, for what an HTTP client library would refuse to send."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0


def test_particle_form_body_as_particle_sends_it(server: Server) -> None:
    headers = {**BEARER, "User-Agent": "ParticleBot/1.1"}
    response = requests.post(f"{server.url}/webhook/particle", data=particle_form(1), headers=headers, timeout=5)
    assert_accepted(response)


def test_particle_json_body_and_redelivery_across_encodings(server: Server) -> None:
    form = particle_form(2)
    first = requests.post(f"{server.url}/webhook/particle", json=form, headers=BEARER, timeout=5)
    assert first.status_code == 202
    reordered = dict(reversed(list(form.items())))
    again = requests.post(f"{server.url}/webhook/particle", data=reordered, headers=BEARER, timeout=5)
    assert again.status_code == 200
    assert again.json() == {"status": "duplicate", "id": first.json()["id"]}


def test_githubs_published_test_vector(server: Server) -> None:
    assert hub_signature(b"Hello, World!") == GITHUB_VECTOR
    headers = {"Content-Type": "application/json", "X-Hub-Signature-256": GITHUB_VECTOR}
    # The signature is right, so auth passes and the answer is about the body: not JSON.
    response = requests.post(f"{server.url}/webhook", data=b"Hello, World!", headers=headers, timeout=5)
    assert response.status_code == 400 and response.json()["error"] == "malformed_body"
    wrong = {**headers, "X-Hub-Signature-256": "sha256=" + "0" * 64}
    assert requests.post(f"{server.url}/webhook", data=b"Hello, World!", headers=wrong, timeout=5).status_code == 401


def test_signed_json_and_github_redelivery(server: Server) -> None:
    body = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1}).encode()
    headers = {
        "Content-Type": "application/json",
        "X-Hub-Signature-256": hub_signature(body),
        "X-GitHub-Event": "ping",
        "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
    }
    first = requests.post(f"{server.url}/webhook", data=body, headers=headers, timeout=5)
    again = requests.post(f"{server.url}/webhook", data=body, headers=headers, timeout=5)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"]


def test_oversize_body_with_content_length_is_refused_before_reading(server: Server) -> None:
    body = urlencode(particle_form(3, data="x" * (LIMIT * 4))).encode()
    head = (
        f"POST /webhook/particle HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n\r\n"
    ).encode()
    # Only the head is sent: the answer must come without the body ever being read.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head)
        answer = b""
        while b'"payload_too_large"' not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    assert status_of(answer) == 413
    assert b'"payload_too_large"' in answer


def test_oversize_chunked_body_without_content_length(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"a" * 1024

    headers = {**BEARER, "Content-Type": "application/json"}
    response = requests.post(f"{server.url}/webhook/particle", data=chunks(), headers=headers, timeout=5)
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"


def test_a_chunked_body_under_the_limit_is_accepted(server: Server) -> None:
    payload = json.dumps(particle_form(4)).encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 7):
            yield payload[i : i + 7]

    headers = {**BEARER, "Content-Type": "application/json"}
    assert requests.post(f"{server.url}/webhook/particle", data=chunks(), headers=headers, timeout=5).status_code == 202


HOSTILE_BODIES = {
    "random bytes": bytes(random.Random(7).getrandbits(8) for _ in range(3000)),
    "invalid utf-8": b'{"event": "\xff\xfe", "coreid": "api"}',
    "10,000-deep arrays": b"[" * 10_000 + b"]" * 10_000,
    "10,000-deep objects": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    "NaN literal": b'{"event": "m", "data": NaN, "coreid": "api", "published_at": "2026-11-23T18:02:11Z"}',
    "Infinity literal": b'{"event": "m", "data": -Infinity, "coreid": "api", "published_at": "2026-11-23T18:02:11Z"}',
    "1e999": b'{"event": "m", "data": 1e999, "coreid": "api", "published_at": "2026-11-23T18:02:11Z"}',
    "lone surrogate": b'{"event": "\\ud800", "coreid": "api", "published_at": "2026-11-23T18:02:11Z"}',
    "NUL in text": b'{"event": "a\\u0000b", "coreid": "api", "published_at": "2026-11-23T18:02:11Z"}',
    "truncated": b'{"event": "motion", "coreid": ',
    "empty": b"",
    "top-level array": b"[1, 2, 3]",
    "huge integer": b'{"data": ' + b"9" * 4000 + b"}",
}


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
@pytest.mark.parametrize("path", ["/webhook/particle", "/webhook"])
def test_hostile_bodies_never_get_a_server_error(server: Server, name: str, path: str) -> None:
    body = HOSTILE_BODIES[name][:LIMIT]
    headers = {"Content-Type": "application/json"}
    headers.update(BEARER if path.endswith("particle") else {"X-Hub-Signature-256": hub_signature(body)})
    response = requests.post(server.url + path, data=body, headers=headers, timeout=10)
    assert response.status_code < 500, (name, response.status_code, response.text[:200])
    if response.status_code >= 400:
        assert set(response.json()) >= {"error", "message"}
    else:  # a big integer is valid JSON for a source that takes any object
        assert (name, path) == ("huge integer", "/webhook")


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", id="huge header"),
        pytest.param(
            b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(500)) + b"\r\n",
            id="500 headers",
        ),
        pytest.param(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", id="huge request line"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n", id="TLS hello"),
        pytest.param(b"POST /webhook/particle HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", id="negative length"),
        pytest.param(
            b"POST /webhook/particle HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", id="bad chunk"
        ),
    ],
)
def test_malformed_http_never_gets_a_server_error(server: Server, request_bytes: bytes) -> None:
    answer = raw_request(server, request_bytes)
    assert answer == b"" or 400 <= status_of(answer) < 500, answer[:200]
    assert requests.get(server.url + "/health", timeout=5).status_code == 200  # still serving


def test_errors_and_health_over_real_http(server: Server) -> None:
    assert requests.get(server.url + "/nothing-here", timeout=5).json()["error"] == "not_found"
    wrong_method = requests.get(server.url + "/webhook/particle", timeout=5)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"] == "method_not_allowed"
    health = requests.get(server.url + "/health", timeout=5)
    assert health.json()["status"] == "healthy"
    for response in (wrong_method, health):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert "Strict-Transport-Security" not in response.headers  # plain HTTP


def test_rate_limit_is_exact_across_two_workers(tmp_path: Path) -> None:
    """Counts live in the shared store, not per worker: 10/minute lets exactly 10 through."""
    env = {
        "PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET,
        "DATA_DIR": tmp_path / "data",
        "RATE_LIMIT": "10/minute",
        "WEB_CONCURRENCY": 2,
    }
    with Server(env, tmp_path, command="web") as server:
        pids = set()
        statuses = []
        for n in range(30):
            # A new connection each time, so both workers get some of the requests.
            response = requests.post(
                f"{server.url}/webhook/particle",
                data=particle_form(100 + n),
                headers={**BEARER, "Connection": "close"},
                timeout=5,
            )
            statuses.append(response.status_code)
            pids.add(requests.get(server.url + "/health", headers={"Connection": "close"}, timeout=5).json()["pid"])
        assert statuses.count(202) == 10, statuses
        assert statuses.count(429) == 20
        retry_after = int(response.headers["Retry-After"])
        assert 0 < retry_after <= 60
    print(f"\nrate limit across {len(pids)} worker processes: {statuses.count(202)} of 30 accepted at 10/minute")


def test_acknowledgement_is_fast(server: Server) -> None:
    session = requests.Session()
    timings = []
    for n in range(50):
        started = time.perf_counter()
        response = session.post(
            f"{server.url}/webhook/particle", data=particle_form(1000 + n), headers=BEARER, timeout=5
        )
        timings.append(time.perf_counter() - started)
        assert response.status_code == 202
    timings.sort()
    # Generous bound for a loaded 2-core CI machine; bench/ingest measures it properly.
    assert timings[len(timings) // 2] < 0.1
