"""The ways in: parse, authenticate, validate, store, answer 202.

The checks run in the contract's order (404, 405, 413, 401, 415, 400, 422), so a caller
without credentials learns nothing about what the body should look like.
"""

from __future__ import annotations

from typing import Protocol

from flask import Blueprint, Response, current_app, g, jsonify, request
from flask.blueprints import BlueprintSetupState
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Rule

from webhook_server.auth import Refused, authenticate
from webhook_server.errors import AddressNotAllowed, BadCredentials, StoreUnavailable
from webhook_server.ingest.audit import accepted_writer as audited
from webhook_server.ingest.body import parse_payload, read_body
from webhook_server.ingest.events import describe, kept_headers
from webhook_server.ingest.ratelimit import get_rate_limits
from webhook_server.ingest.sources import Source
from webhook_server.ingest.validate import validate
from webhook_server.store.base import STORE_ERRORS
from webhook_server.store.extension import event_stored, get_store
from webhook_server.store.records import Received

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


class IngestSettings(Protocol):
    """What the way in needs of the settings (`webhook_server.settings.Settings` has it)."""

    @property
    def sources(self) -> dict[str, Source]: ...

    @property
    def max_payload_bytes(self) -> int: ...


def settings() -> IngestSettings:
    value: IngestSettings = current_app.config["SETTINGS"]
    return value


def resolve_source(name: str) -> Source:
    """The enabled source for this path, and the 404/405/403 checks that need no body."""
    # `generic` lives at /webhook only.
    source = None if name == "generic" and request.path != "/webhook" else settings().sources.get(name)
    if source is None:
        raise NotFound("No webhook source is enabled at this path.")
    g.source_name = source.name  # for the metrics and the access log, whatever follows
    if request.method != "POST":
        raise MethodNotAllowed(valid_methods=["POST"])
    if not source.allows(request.remote_addr or ""):
        raise AddressNotAllowed()
    return source


def authenticated(source: Source, body: bytes) -> None:
    """401 unless the request proves it comes from `source` (why not goes to the log only)."""
    try:
        g.key = authenticate(source, request.headers, body)  # the fingerprint, for the audit
    except Refused as exc:
        raise BadCredentials(exc.reason) from None


# `/webhook` has an endpoint of its own: were it `receive` with a default name, Werkzeug would
# answer /webhook/generic with a 308 redirect to /webhook instead of 404.
@bp.route("/webhook", methods=ALL_METHODS, defaults={"name": "generic"}, endpoint="receive_generic")
@bp.route("/webhook/<name>", methods=ALL_METHODS)
def receive(name: str) -> tuple[Response, int]:
    source = resolve_source(name)
    hit = get_rate_limits().check(source, request.remote_addr or "-")
    try:
        body = read_body(request, source.max_payload_bytes or settings().max_payload_bytes)
        authenticated(source, body)
        payload = parse_payload(request.headers, body, particle=source.parser == "particle")
        validate(source.validator, payload, particle=source.parser == "particle")
        event, device, dedupe_key = describe(source, request.headers, payload)
        received = Received(body, request.content_type or "", kept_headers(source, request.headers.items()))
    except HTTPException:
        g.hit = hit  # refused requests count too (guessing a secret is limited), with their audit
        raise
    try:
        event_id, created = get_store().insert_event(
            source.name, dedupe_key, event, device, request.remote_addr, payload, hit.count_in, received, audited()
        )
    except STORE_ERRORS as exc:
        current_app.logger.error("event store refused a write: %s", exc)
        raise StoreUnavailable() from None
    if created:
        event_stored.send(get_store(), event_id=event_id)  # the live stream hears of it
    g.audited = True
    g.outcome = "accepted" if created else "duplicate"
    g.event_id = event_id
    return jsonify(status=g.outcome, id=event_id), 202 if created else 200
