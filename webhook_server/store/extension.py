"""The store as a Flask extension: one store per app, in `app.extensions`; and `open_store`, which
picks SQLite under DATA_DIR or PostgreSQL at DATABASE_URL for the web, the worker and the CLI."""

from __future__ import annotations

from pathlib import Path

from blinker import Namespace
from flask import Flask, current_app

from webhook_server.store.base import EventStore
from webhook_server.store.group import WEB_CHECKPOINT_COMMITS
from webhook_server.store.postgres import PostgresStore
from webhook_server.store.sqlite import Store

EXTENSION_KEY = "webhook_store"
# Sent (by the view, after the commit) with the store as sender and `event_id=` for each new event:
# the live stream listens, so the way in needs to know nothing of who follows.
event_stored = Namespace().signal("event-stored")

# PostgreSQL connections a process may hold: a web process's request threads share one group
# writer (one connection) and each reads a statement at a time, so a few connections serve all of
# its GUNICORN_THREADS (64 connections a process would exhaust PostgreSQL's default
# max_connections of 100 with two of them); the worker sends up to 8 notifications and each
# target's 4 forwards at once, each finishing in a short transaction of its own.
WEB_POOL_SIZE = 8
WORKER_POOL_SIZE = 16
COMMAND_POOL_SIZE = 2


def open_store(
    database_url: str | None, database_path: Path, pool_size: int = COMMAND_POOL_SIZE, web: bool = False
) -> EventStore:
    """PostgreSQL at DATABASE_URL, else SQLite at `database_path`; its schema created or brought up to date."""
    if database_url:
        return PostgresStore(database_url, pool_size)
    if web:
        # The web side retries locked writes itself (write_retrying), so SQLite must not sleep;
        # the delivery worker checkpoints the WAL, the web processes only when it seems not to run.
        return Store(database_path, busy_timeout_ms=0, checkpoint_after=WEB_CHECKPOINT_COMMITS)
    return Store(database_path)


def init_app(app: Flask, database_url: str | None, database_path: Path, web_threads: int) -> EventStore:
    store = open_store(database_url, database_path, min(web_threads + 1, WEB_POOL_SIZE), web=True)
    app.extensions[EXTENSION_KEY] = store
    return store


def get_store() -> EventStore:
    store: EventStore = current_app.extensions[EXTENSION_KEY]
    return store
