"""The ways in: parse, authenticate, validate, store, answer 202.

The checks run in the contract's order (404, 405, 413, 401, 415, 400, 422), so a caller
without credentials learns nothing about what the body should look like.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request
from flask.blueprints import BlueprintSetupState
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Rule

from . import parsing
from .auth import DELIVERY_ID_HEADERS, authenticate
from .config import Settings
from .errors import AddressNotAllowed, MalformedBody, PayloadTooLarge, StoreUnavailable
from .ratelimit import get_rate_limits
from .sources import Source
from .store import get_store

bp = Blueprint("webhooks", __name__)

# Every method reaches the view, so an unknown source is a 404 before a wrong method is a 405.
# OPTIONS is listed too, or Flask would answer it itself with 200 even for an unknown source.
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@bp.record_once
def _any_method(state: BlueprintSetupState) -> None:
    """The same rules without a method list, which Werkzeug matches for any method (TRACE,
    PROPFIND, ...): Flask's own rules always list theirs, and routing would answer 405."""
    state.app.url_map.add(Rule("/webhook", endpoint="webhooks.receive_generic", defaults={"name": "generic"}))
    state.app.url_map.add(Rule("/webhook/<name>", endpoint="webhooks.receive"))


MAX_NAME_LENGTH = 200


def settings() -> Settings:
    value: Settings = current_app.config["SETTINGS"]
    return value


def enabled_source(name: str) -> Source | None:
    """The source at this path, or None where none is enabled (`generic` lives at /webhook)."""
    if name == "generic" and request.path != "/webhook":
        return None
    return settings().sources.get(name)


def resolve_source(name: str) -> Source:
    """The enabled source for this path, and the 404/405/403 checks that need no body."""
    source = enabled_source(name)
    if source is None:
        raise NotFound("No webhook source is enabled at this path.")
    if request.method != "POST":
        raise MethodNotAllowed(valid_methods=["POST"])
    g.source_name = source.name
    if not source.allows(request.remote_addr or ""):
        raise AddressNotAllowed()
    return source


def read_body(limit: int) -> bytes:
    """The raw body, refused with 413 before reading when it is known to be too long.

    A chunked body has no Content-Length, so read at most limit + 1 bytes: getting the
    extra byte means it is too long (Flask's MAX_CONTENT_LENGTH would silently truncate it).
    """
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"The body is over the limit of {limit} bytes.")
    # A stream may return fewer bytes than asked for before its end: read until the end
    # or one byte past the limit.
    chunks: list[bytes] = []
    size = 0
    expected = request.content_length
    while size <= limit and size != expected:  # with a Content-Length, no read past the end
        try:
            chunk = request.stream.read(limit + 1 - size)
        # The server raises its own parse errors (a bad chunk size, a client gone mid-body):
        # they are the client's fault, never a 500.
        except Exception:
            raise MalformedBody("The body could not be read (bad chunked encoding or a dropped connection).") from None
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    body = b"".join(chunks)
    if len(body) > limit:
        raise PayloadTooLarge(f"The body is over the limit of {limit} bytes.")
    return body


def parse_payload(source: Source, body: bytes) -> Any:
    mimetype = parsing.require_media_type(request.headers, allow_form=True)
    if mimetype != parsing.FORM:
        return parsing.parse_json(body)
    form = parsing.parse_form(body)
    if source.parser == "particle":
        return form
    # GitHub's form option wraps the JSON document in a `payload` field.
    if set(form) != {"payload"}:
        raise MalformedBody("A form-encoded body must carry the JSON document in a 'payload' field.")
    return parsing.parse_json(form["payload"].encode())


def describe(source: Source, payload: Any) -> tuple[str, str, str | None]:
    """(event name, device, dedupe key) for this source's payload."""
    if source.parser == "particle":
        return str(payload["event"]), str(payload["coreid"]).lower(), parsing.particle_dedupe_key(payload)
    body = payload if isinstance(payload, dict) else {}
    event = request.headers.get("X-GitHub-Event") or _string(body.get("event")) or _string(body.get("type")) or ""
    device = _string(body.get("device")) or ""
    delivery_id = next((request.headers[h] for h in DELIVERY_ID_HEADERS if request.headers.get(h)), None)
    if delivery_id is None and source.scheme == "stripe":
        delivery_id = _string(body.get("id"))
    key = f"d:{delivery_id[:MAX_NAME_LENGTH]}" if delivery_id else None
    return event[:MAX_NAME_LENGTH], device[:MAX_NAME_LENGTH], key


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# `/webhook` has an endpoint of its own: were it `receive` with a default name, Werkzeug would
# answer /webhook/generic with a 308 redirect to /webhook instead of 404.
@bp.route("/webhook", methods=ALL_METHODS, defaults={"name": "generic"}, endpoint="receive_generic")
@bp.route("/webhook/<name>", methods=ALL_METHODS)
def receive(name: str) -> tuple[Response, int]:
    source = resolve_source(name)
    hit = get_rate_limits().check(source, request.remote_addr or "-")
    try:
        body = read_body(source.max_payload_bytes or settings().max_payload_bytes)
        authenticate(source, request.headers, body)
        payload = parse_payload(source, body)
        parsing.validate(source.validator, payload, particle=source.parser == "particle")
        event, device, dedupe_key = describe(source, payload)
    except HTTPException:
        hit.count_quietly()  # refused requests count too: guessing a secret is limited
        raise
    try:
        event_id, created = get_store().insert_event(
            source.name, dedupe_key, event, device, request.remote_addr, payload, before=hit.count_in
        )
    except sqlite3.Error as exc:
        current_app.logger.error("event store refused a write: %s", exc)
        raise StoreUnavailable() from None
    g.outcome = "accepted" if created else "duplicate"
    g.event_id = event_id
    return jsonify(status=g.outcome, id=event_id), 202 if created else 200
