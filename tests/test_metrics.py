"""`/metrics`: access rules, the figures, and counts that add up across Gunicorn workers."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PARTICLE_SECRET, assert_error, assert_unauthorized, base_settings, bearer, particle_event
from tests.server import Server
from webhook_server.ops import metrics

pytestmark = pytest.mark.usefixtures("each_store")

METRICS_TOKEN = "metrics-token-0123456789abcdef"
ACCEPTED = ("webhook_requests_total", {"source": "particle", "outcome": "accepted"})


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels); fails if it does not parse."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    return samples(text).get((name, tuple(sorted((labels or {}).items()))), 0.0)


def scrape(client: FlaskClient, **headers: str) -> str:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_data(as_text=True)


def post_particle(client: FlaskClient, **fields: Any) -> int:
    return client.post("/webhook/particle", json=particle_event(**fields), headers=bearer()).status_code


# -- through the test client -----------------------------------------------------------------


def test_metrics_are_open_by_default_and_parse(client: FlaskClient) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert "version=0.0.4" in response.content_type
    names = {family.name for family in text_string_to_metric_families(response.get_data(as_text=True))}
    assert {
        "webhook_requests",
        "webhook_ack_seconds",
        "webhook_deliveries",
        "webhook_delivery_seconds",
        "webhook_live_subscribers",
        "webhook_queue_depth",
        "webhook_dead_letters",
        "webhook_events_accepted",
        "webhook_store_up",
    } <= names
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_requests_are_counted_by_source_and_outcome(client: FlaskClient) -> None:
    before = scrape(client)
    assert post_particle(client, data="counted") == 202
    assert post_particle(client, data="counted") == 200
    assert client.post("/webhook/particle", json=particle_event()).status_code == 401
    assert client.post("/webhook/particle", data="x", headers=bearer()).status_code == 415
    assert client.post("/webhook/particle", json={"event": "x"}, headers=bearer()).status_code == 422
    assert client.post("/webhook/no-such-source", json={}).status_code == 404
    assert client.get("/webhook/particle").status_code == 405
    after = scrape(client)

    def delta(source: str, outcome: str) -> float:
        labels = {"source": source, "outcome": outcome}
        return value(after, "webhook_requests_total", labels) - value(before, "webhook_requests_total", labels)

    assert delta("particle", "accepted") == 1
    assert delta("particle", "duplicate") == 1
    assert delta("particle", "unauthorized") == 1
    assert delta("particle", "unsupported") == 1
    assert delta("particle", "invalid") == 1
    assert delta("particle", "method_not_allowed") == 1
    # A name from the URL never becomes a label value.
    assert delta("unknown", "not_found") == 1
    assert not any("no-such-source" in line for line in after.splitlines())
    # Six POSTs were timed, the GET was not.
    ack = value(after, "webhook_ack_seconds_count") - value(before, "webhook_ack_seconds_count")
    assert ack == 6
    assert value(after, "webhook_ack_seconds_bucket", {"le": "+Inf"}) == value(after, "webhook_ack_seconds_count")


def test_rate_limited_requests_are_counted_and_metrics_are_exempt(
    make_app: Callable[..., Flask],
) -> None:
    client = make_app(RATE_LIMIT="2/minute").test_client()
    before = scrape(client)
    statuses = [post_particle(client, data=str(i)) for i in range(4)]
    assert statuses == [202, 202, 429, 429]
    # /metrics is on its own blueprint: never rate limited.
    for _ in range(5):
        after = scrape(client)
    labels = {"source": "particle", "outcome": "rate_limited"}
    assert value(after, "webhook_requests_total", labels) - value(before, "webhook_requests_total", labels) == 2


def test_store_gauges_are_read_at_scrape_time(app: Flask, client: FlaskClient) -> None:
    for i in range(3):
        assert post_particle(client, data=f"gauge {i}") == 202
    store = app.extensions["webhook_store"]
    with store.transaction() as conn:
        now = time.time()
        for status in ("pending", "pending", "dead", "sent"):
            conn.execute(
                "INSERT INTO deliveries (event_id, kind, channel, recipient, status,"
                " next_attempt_at, created_at) VALUES (1, 'alert', 'email', 'a@x.com', ?, ?, ?)",
                (status, now, now),
            )
    text = scrape(client)
    assert value(text, "webhook_events_accepted_total") == 3
    assert value(text, "webhook_queue_depth") == 2
    assert value(text, "webhook_dead_letters") == 1
    assert value(text, "webhook_store_up") == 1
    assert value(text, "webhook_live_subscribers") == 0


def test_a_store_that_does_not_answer_is_reported_not_a_500(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> dict[str, int]:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(app.extensions["webhook_store"], "counts", broken)
    text = scrape(client)
    assert value(text, "webhook_store_up") == 0
    assert "webhook_queue_depth" not in text


def test_record_delivery_counts_outcomes_and_latency(client: FlaskClient) -> None:
    before = scrape(client)
    metrics.record_delivery("email", "sent", 1.5)
    metrics.record_delivery("email", "pending", None)  # the worker's word for a retry
    metrics.record_delivery("email", "retry")
    metrics.record_delivery("sms", "dead", None)
    after = scrape(client)

    def delta(name: str, labels: dict[str, str]) -> float:
        return value(after, name, labels) - value(before, name, labels)

    assert delta("webhook_deliveries_total", {"channel": "email", "outcome": "sent"}) == 1
    assert delta("webhook_deliveries_total", {"channel": "email", "outcome": "retry"}) == 2
    assert delta("webhook_deliveries_total", {"channel": "sms", "outcome": "dead"}) == 1
    assert delta("webhook_delivery_seconds_count", {"channel": "email"}) == 1
    assert delta("webhook_delivery_seconds_bucket", {"channel": "email", "le": "1.0"}) == 0
    assert delta("webhook_delivery_seconds_bucket", {"channel": "email", "le": "2.5"}) == 1


def test_live_subscriber_gauge(client: FlaskClient) -> None:
    with metrics.live_subscriber("particle"):
        assert value(scrape(client), "webhook_live_subscribers", {"channel": "particle"}) == 1
    assert value(scrape(client), "webhook_live_subscribers", {"channel": "particle"}) == 0


def test_a_metrics_token_is_required_when_set(make_app: Callable[..., Flask]) -> None:
    client = make_app(METRICS_TOKEN=METRICS_TOKEN).test_client()
    missing = client.get("/metrics")
    assert_unauthorized(missing)
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert_unauthorized(client.get("/metrics", headers=bearer("wrong-token-0123456789abcdef")))
    assert_unauthorized(client.get("/metrics", headers={"Authorization": f"Basic {METRICS_TOKEN}"}))
    assert_unauthorized(client.get("/metrics", headers=bearer(METRICS_TOKEN + "x")))
    # The same message whatever was wrong.
    assert missing.get_json() == client.get("/metrics", headers=bearer("nope")).get_json()
    assert client.get("/metrics", headers=bearer(METRICS_TOKEN)).status_code == 200
    assert client.get("/metrics", headers={"Authorization": f"bearer  {METRICS_TOKEN}"}).status_code == 200
    # A wrong method is a 405 before a missing token is a 401 (the contract's order).
    assert_error(client.post("/metrics"), 405, "method_not_allowed")


def test_disable_system_info_hides_metrics(make_app: Callable[..., Flask]) -> None:
    client = make_app(DISABLE_SYSTEM_INFO="true").test_client()
    hidden = client.get("/metrics", headers=bearer("anything-at-all-0123456789"))
    assert_error(hidden, 404, "not_found")
    # Exactly what a path that does not exist answers.
    assert hidden.get_json() == client.get("/no-such-path").get_json()
    for method in ("post", "put", "delete", "options", "head"):
        assert getattr(client, method)("/metrics").status_code == 404


def test_disable_system_info_with_a_token_shows_metrics_to_its_holder(
    make_app: Callable[..., Flask],
) -> None:
    client = make_app(DISABLE_SYSTEM_INFO="true", METRICS_TOKEN=METRICS_TOKEN).test_client()
    assert_error(client.get("/metrics"), 404, "not_found")
    assert_error(client.get("/metrics", headers=bearer("wrong-token-0123456789abcdef")), 404, "not_found")
    assert_error(client.post("/metrics"), 404, "not_found")
    response = client.get("/metrics", headers=bearer(METRICS_TOKEN))
    assert response.status_code == 200
    assert list(text_string_to_metric_families(response.get_data(as_text=True)))
    assert_error(client.post("/metrics", headers=bearer(METRICS_TOKEN)), 405, "method_not_allowed")


# -- the multiprocess directory ----------------------------------------------------------------


def test_clear_stale_files_keeps_live_processes_and_other_hosts(tmp_path: Path) -> None:
    dead_pid = 4_194_305  # above Linux's largest pid_max: never a live process
    own = tmp_path / f"counter_{metrics.process_identifier()}.db"
    dead = tmp_path / f"counter_{metrics.process_identifier(dead_pid)}.db"
    dead_gauge = tmp_path / f"gauge_livesum_{metrics.process_identifier(dead_pid)}.db"
    other_host = tmp_path / "counter_otherhost-1.db"
    foreign = tmp_path / "histogram_123456789.db"  # prometheus_client's default naming
    for path in (own, dead, dead_gauge, other_host, foreign):
        path.write_bytes(b"")
    assert metrics.clear_stale_files(str(tmp_path)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([own.name, other_host.name])
    assert metrics.clear_stale_files(str(tmp_path), keep_live=False) == 1
    assert [p.name for p in tmp_path.iterdir()] == [other_host.name]


def test_ensure_multiprocess_dir_defaults_under_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(metrics.ENV_VAR, raising=False)
    path = metrics.ensure_multiprocess_dir(tmp_path / "data")
    assert path == (tmp_path / "data" / "prometheus").resolve()
    assert os.environ[metrics.ENV_VAR] == str(path) and path.is_dir()
    # A value already set wins.
    chosen = tmp_path / "elsewhere"
    monkeypatch.setenv(metrics.ENV_VAR, str(chosen))
    assert metrics.ensure_multiprocess_dir(tmp_path / "data") == chosen.resolve()


# -- a real Gunicorn with two workers ------------------------------------------------------------


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """One request on its own connection (urllib sends `Connection: close`)."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def gunicorn_workers(master: int) -> set[int]:
    """The pids whose parent is `master`, from /proc."""
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its closing paren.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == master:
            children.add(int(entry))
    return children


def plant_stale_counter(directory: Path, count: float) -> Path:
    """A counter file as a worker of an earlier run would have left it."""
    path = directory / f"counter_{metrics.process_identifier(4_194_305)}.db"
    stale = MmapedDict(str(path))
    key = mmap_key(
        "webhook_requests",
        "webhook_requests_total",
        ["source", "outcome"],
        ["particle", "accepted"],
        "Webhook requests answered, by source and outcome.",
    )
    stale.write_value(key, count, 0.0)
    stale.close()
    return path


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_counts_add_up_across_gunicorn_workers_and_survive_a_worker_restart(tmp_path: Path) -> None:
    # No PROMETHEUS_MULTIPROC_DIR: the CLI puts it under DATA_DIR.
    directory = tmp_path / "data" / "prometheus"
    directory.mkdir(parents=True)
    stale = plant_stale_counter(directory, 1000)
    env = {**base_settings(tmp_path), "WEB_CONCURRENCY": "2", "GUNICORN_THREADS": "4"}
    server = Server(env, tmp_path, command="web")
    with server:
        assert server.process is not None
        master = server.process.pid
        # The earlier run's file is gone: its 1000 must not show.
        assert not stale.exists()
        headers = {**bearer(PARTICLE_SECRET), "Content-Type": "application/json"}
        n = 40
        for i in range(n):
            body = json.dumps(particle_event(data=f"event {i}")).encode()
            assert http("POST", server.url + "/webhook/particle", body, headers)[0] == 202
        workers = gunicorn_workers(master)
        assert len(workers) == 2
        # Both workers answered some of the events: each has its own counter file.
        counted_by = {p for p in workers if (directory / f"counter_{metrics.process_identifier(p)}.db").exists()}
        assert counted_by == workers, sorted(p.name for p in directory.iterdir())
        status, text = http("GET", server.url + "/metrics")
        assert status == 200
        assert value(text, *ACCEPTED) == n
        assert value(text, "webhook_ack_seconds_count") == n
        assert value(text, "webhook_events_accepted_total") == n

        victim = min(workers)
        os.kill(victim, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = gunicorn_workers(master)
            if victim not in now and len(now) == 2:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"Gunicorn did not replace worker {victim}:\n{server.output()}")
        server.wait_healthy(10)
        for _ in range(6):  # several connections, so both workers answer some scrapes
            status, text = http("GET", server.url + "/metrics")
            assert status == 200
            assert value(text, *ACCEPTED) == n  # not lost, not doubled
            assert value(text, "webhook_live_subscribers") == 0
        # child_exit marked it dead: its live gauge file is gone, its counter file stays.
        dead_id = metrics.process_identifier(victim)
        assert not (directory / f"gauge_livesum_{dead_id}.db").exists()
        assert (directory / f"counter_{dead_id}.db").exists()

        more = 10
        for i in range(more):
            body = json.dumps(particle_event(data=f"after restart {i}")).encode()
            assert http("POST", server.url + "/webhook/particle", body, headers)[0] == 202
        assert value(http("GET", server.url + "/metrics")[1], *ACCEPTED) == n + more


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_serve_shows_the_delivery_workers_counts(tmp_path: Path) -> None:
    """`serve`: the delivery worker is another process; its counts reach the web's /metrics."""
    env = {**base_settings(tmp_path), "WORKER_POLL_SECONDS": "0.05"}
    with Server(env, tmp_path, command="serve") as server:
        body = json.dumps(particle_event(data="delivered")).encode()
        headers = {**bearer(PARTICLE_SECRET), "Content-Type": "application/json"}
        assert http("POST", server.url + "/webhook/particle", body, headers)[0] == 202
        sent = {"channel": "log", "outcome": "sent"}  # no SMTP configured: notifications go to the log
        deadline = time.monotonic() + 20
        text = ""
        while time.monotonic() < deadline:
            text = http("GET", server.url + "/metrics")[1]
            if value(text, "webhook_deliveries_total", sent) >= 1:
                break
            time.sleep(0.1)
        assert value(text, "webhook_deliveries_total", sent) == 1, text
        assert value(text, "webhook_delivery_seconds_count", {"channel": "log"}) == 1
        assert value(text, "webhook_queue_depth") == 0
