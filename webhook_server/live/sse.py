"""`GET /events/<channel>`: the live stream as Server-Sent Events, resumable with Last-Event-ID.

Every event carries its id on an `id:` line, so a browser's EventSource (or `webhook-server
listen`) resumes after the last one it got. `?since=<id>` does the same without the header;
`?poll=1` sends what is stored after the cursor and closes; `?raw=1` adds what was received
(content type, headers, body). Refusals are JSON, before the stream starts.
"""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Callable, Iterator

from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import NotFound

from webhook_server.errors import MalformedBody, StoreUnavailable
from webhook_server.live import access
from webhook_server.live.service import Live, get_live, stopping
from webhook_server.live.stream import Heartbeat, Item, Overflow, Reset, backlog, follow, starting_point
from webhook_server.ops.metrics import live_subscriber, record_streamed
from webhook_server.settings import Settings
from webhook_server.store.base import STORE_ERRORS, EventStore
from webhook_server.store.extension import get_store
from webhook_server.store.records import StoredEvent

bp = Blueprint("live", __name__)
RETRY_MS = 2000  # what an EventSource waits before it reconnects


def subscription() -> tuple[Live, frozenset[str], int | None]:
    """The checks that need no stream: 404 when streams are off, 401, 404/403 for the channel, 400."""
    settings: Settings = current_app.config["SETTINGS"]
    live = get_live()
    if live is None:
        raise NotFound("The live stream is off (no SUBSCRIBER_TOKENS).")
    token = access.token_of(request.headers, request.args.get("token"))
    allowed = access.allowed_channels(settings.subscriber_tokens, token)
    channels = access.resolve(
        request.view_args["channels"] if request.view_args else "", allowed, frozenset(settings.sources)
    )
    return live, channels, cursor()


def cursor() -> int | None:
    given = request.headers.get("Last-Event-ID") or request.args.get("since")
    if given is None or given == "":
        return None
    if not given.isascii() or not given.isdigit() or len(given) > 19:
        raise MalformedBody("Last-Event-ID and since must be an event id (digits).")
    return int(given)


def frame(item: Item, raw: bool) -> bytes:
    """One SSE message."""
    if isinstance(item, StoredEvent):
        return f"id: {item.id}\nevent: message\ndata: {item.encoded(raw)}\n\n".encode()
    if isinstance(item, Reset):
        return f'event: reset\ndata: {{"type":"reset","oldest":"{item.oldest}"}}\n\n'.encode()
    if isinstance(item, Overflow):
        return f"event: overflow\ndata: {json.dumps({'type': 'overflow', 'reason': item.reason})}\n\n".encode()
    if isinstance(item, Heartbeat):
        return b": heartbeat\n\n"
    return b": live\n\n"  # the backlog is sent


@bp.get("/events/<path:channels>")
def events(channels: str) -> Response:
    live, sources, since = subscription()
    raw = request.args.get("raw") == "1"
    store = get_store()
    if request.args.get("poll") == "1":
        # Read before the response starts, so that a store that does not answer is a 503.
        try:
            cursor, reset = starting_point(store, since, store.newest_id())
        except STORE_ERRORS:
            raise StoreUnavailable() from None
        body = poll(store, sources, cursor, reset, raw)
        return Response(body, mimetype="text/event-stream", headers=STREAM_HEADERS)
    live.take_place()  # 503 now, before the stream starts, when this process is full
    client = request.environ.get("gunicorn.socket")
    body = stream(store, live, sources, since, raw, channels, ended(client) if client is not None else stopping)
    return Response(body, mimetype="text/event-stream", headers=STREAM_HEADERS)


STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def poll(store: EventStore, sources: frozenset[str], cursor: int, reset: Reset | None, raw: bool) -> Iterator[bytes]:
    """The stored events after the cursor, and the end (for scripts and cron)."""
    if reset is not None:
        yield frame(reset, raw)
    sent = 0
    for event in backlog(store, sources, cursor):
        sent += 1
        yield frame(event, raw)
    record_streamed("sse", sent)


def ended(client: socket.socket) -> Callable[[], bool]:
    """True once the worker stops or the client has hung up (checked about once a second while
    idle): a subscriber that went away gives its thread back at once, not at the next heartbeat."""

    def check() -> bool:
        if stopping():
            return True
        try:
            readable, _, _ = select.select([client], [], [], 0)
            # A subscriber sends nothing after its request: readable means it closed (b"") or broke.
            return bool(readable) and client.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    return check


def stream(
    store: EventStore,
    live: Live,
    sources: frozenset[str],
    since: int | None,
    raw: bool,
    asked: str,
    done: Callable[[], bool] = stopping,
) -> Iterator[bytes]:
    """The live stream, until the client goes, overflows, or the worker stops."""
    try:
        with live_subscriber(asked):
            yield f"retry: {RETRY_MS}\n: connected\n\n".encode()
            for item in follow(store, live.hub, sources, since, done):
                yield frame(item, raw)
                if isinstance(item, StoredEvent):
                    record_streamed("sse")
                elif isinstance(item, Overflow):
                    record_streamed("sse", 0, overflow=True)
    finally:
        live.leave()
