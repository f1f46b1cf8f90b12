"""What is kept of each accepted event: the raw body, its content type and the sender's headers
without credentials, in the event's own row (contract: "What is kept")."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import assert_accepted, bearer, particle_event, signed_headers
from webhook_server.store.extension import get_store
from webhook_server.store.records import StoredEvent
from webhook_server.store.sqlite import Store


def stored(app: Flask, event_id: str) -> StoredEvent:
    with app.app_context():
        event = get_store().get_event(event_id)
    assert event is not None
    return event


@pytest.mark.usefixtures("each_store")
def test_a_signed_body_is_kept_byte_for_byte_with_its_signature(app: Flask, client: FlaskClient) -> None:
    body = b'{"zen":  "Keep it simple.",\n "n": 1.50}'  # spacing and 1.50 would not survive a re-encoding
    headers = signed_headers(
        body, **{"X-GitHub-Event": "ping", "X-GitHub-Delivery": "d-1", "X-Forwarded-For": "1.2.3.4"}
    )
    event_id = assert_accepted(client.post("/webhook", data=body, headers=headers))
    kept = stored(app, event_id).received
    assert kept is not None
    assert kept.body == body
    assert kept.content_type == "application/json"
    names = [name for name, _ in kept.headers]
    assert ("X-Hub-Signature-256", headers["X-Hub-Signature-256"]) in kept.headers
    assert ("X-Github-Event", "ping") in kept.headers or ("X-GitHub-Event", "ping") in kept.headers
    # The transport's and the proxy's, not the sender's:
    for name in ("Host", "Content-Length", "Content-Type", "X-Forwarded-For"):
        assert name.lower() not in [n.lower() for n in names], name


@pytest.mark.usefixtures("each_store")
def test_a_bearer_token_is_never_kept(app: Flask, client: FlaskClient) -> None:
    form = particle_event()
    response = client.post(
        "/webhook/particle", data=form, headers={**bearer(), "Cookie": "session=abc", "User-Agent": "ParticleBot/1.1"}
    )
    event = stored(app, assert_accepted(response))
    assert event.received is not None
    assert event.received.content_type == "application/x-www-form-urlencoded"
    kept = {name.lower(): value for name, value in event.received.headers}
    assert "authorization" not in kept and "cookie" not in kept
    assert kept["user-agent"] == "ParticleBot/1.1"
    assert all("particle-secret" not in value for value in kept.values())


@pytest.mark.usefixtures("each_store")
def test_raw_fields_in_the_event_json(app: Flask, client: FlaskClient) -> None:
    body = json.dumps({"event": "deploy"}).encode()
    event = stored(app, assert_accepted(client.post("/webhook", data=body, headers=signed_headers(body))))
    document = event.as_dict(raw=True)
    assert document["content_type"] == "application/json"
    assert document["body_base64"] == "eyJldmVudCI6ICJkZXBsb3kifQ=="
    assert ["X-Hub-Signature-256", signed_headers(body)["X-Hub-Signature-256"]] in document["headers"]
    assert set(event.as_dict()) == {"id", "source", "received_at", "event", "device", "payload"}


OLD_EVENTS_TABLE = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, dedupe_key TEXT, received_at TEXT NOT NULL,
    event TEXT NOT NULL DEFAULT '', device TEXT NOT NULL DEFAULT '', client_ip TEXT, payload TEXT NOT NULL,
    dispatched INTEGER NOT NULL DEFAULT 0
);
INSERT INTO events (source, received_at, event, payload) VALUES ('particle', '2026-11-01T00:00:00Z', 'motion', '{}');
"""


def test_a_store_made_before_bodies_were_kept_gains_the_columns_and_keeps_its_events(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_EVENTS_TABLE)
    store = Store(path)
    old = store.get_event(1)
    assert old is not None and old.received is None
    assert old.as_dict(raw=True)["body_base64"] is None
    new_id, _ = store.insert_event("particle", None, "motion", "", None, {})
    assert int(new_id) == 2
    Store(path)  # a second start finds the columns there and adds nothing
    columns = [row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(events)")]
    assert columns.count("body") == 1 and "headers" in columns and "content_type" in columns


def test_two_processes_migrating_at_once_both_start(tmp_path: Path, make_app: Callable[..., Flask]) -> None:
    import multiprocessing

    path = tmp_path / "race.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_EVENTS_TABLE)
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=Store, args=(path,)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(10)
    assert [process.exitcode for process in processes] == [0, 0, 0, 0]
