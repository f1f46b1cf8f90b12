"""The store as a Flask extension: one `Store` per app, in `app.extensions`."""

from __future__ import annotations

from pathlib import Path

from blinker import Namespace
from flask import Flask, current_app

from webhook_server.store.group import WEB_CHECKPOINT_COMMITS
from webhook_server.store.sqlite import Store

EXTENSION_KEY = "webhook_store"
# Sent (by the view, after the commit) with the store as sender and `event_id=` for each new event:
# the live stream listens, so the way in needs to know nothing of who follows.
event_stored = Namespace().signal("event-stored")


def init_app(app: Flask, path: Path) -> Store:
    # The web side retries locked writes itself (write_retrying), so SQLite must not sleep;
    # the delivery worker checkpoints the WAL, the web processes only when it seems not to run.
    store = Store(path, busy_timeout_ms=0, checkpoint_after=WEB_CHECKPOINT_COMMITS)
    app.extensions[EXTENSION_KEY] = store
    return store


def get_store() -> Store:
    store: Store = current_app.extensions[EXTENSION_KEY]
    return store
