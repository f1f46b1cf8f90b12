"""Every status a client can get, the errors that map to them, and the one JSON error shape.

`STATUSES` is the one table of statuses: the error name in the body, the outcome label the
metrics and the access log use, and the description the OpenAPI document gives. The error
classes subclass werkzeug's HTTP exceptions and take their name from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, g, jsonify
from werkzeug.exceptions import (
    BadRequest,
    Forbidden,
    HTTPException,
    InternalServerError,
    RequestEntityTooLarge,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    UnprocessableEntity,
    UnsupportedMediaType,
)

from webhook_server.store.base import STORE_ERRORS


@dataclass(frozen=True)
class Status:
    error: str  # the "error" of the JSON body
    outcome: str  # the label in metrics and the access log
    description: str  # what the OpenAPI document says of it


STATUSES: dict[int, Status] = {
    400: Status("malformed_body", "malformed", "Malformed body (not valid JSON, a bad form, bad UTF-8)."),
    401: Status(
        "unauthorized", "unauthorized", "Missing or invalid credentials (the same answer whichever part failed)."
    ),
    403: Status("forbidden", "forbidden", "This client address may not send to this source."),
    404: Status("not_found", "not_found", "No such endpoint, or no source enabled at this path."),
    405: Status("method_not_allowed", "method_not_allowed", "The endpoint does not take this method."),
    413: Status("payload_too_large", "too_large", "The body is over the limit (checked before it is read whole)."),
    415: Status("unsupported_media_type", "unsupported", "Unsupported Content-Type."),
    422: Status("schema_violation", "invalid", "The body parsed but does not match the source's schema."),
    426: Status("upgrade_required", "upgrade_required", "A WebSocket endpoint asked without a WebSocket upgrade."),
    429: Status("rate_limited", "rate_limited", "Rate limit exceeded for this source and client address."),
    500: Status("internal_error", "error", "The server failed; never for anything a client sent."),
    503: Status(
        "unavailable", "unavailable", "The server cannot accept the event safely right now; retry after Retry-After."
    ),
}
# The refusals a webhook endpoint documents (OpenAPI), in the contract's order of checks first.
WEBHOOK_REFUSALS = (404, 405, 413, 401, 415, 400, 422, 403, 429, 503)


def outcome_for(status: int) -> str:
    """The metrics and access-log outcome of a response with no outcome of its own."""
    known = STATUSES.get(status)
    return known.outcome if known else ("error" if status >= 400 else "ok")


class MalformedBody(BadRequest):
    pass


class BadCredentials(Unauthorized):
    """Missing or wrong credentials. One message for every case: no hint of which part failed.

    `reason` says which part it was (a wrong token, a stale timestamp, a malformed signature
    header) for the server's log only; it never reaches the response.
    """

    description = "Missing or invalid credentials."

    def __init__(self, reason: str = "missing or invalid credentials") -> None:
        super().__init__()
        self.reason = reason


class AddressNotAllowed(Forbidden):
    description = "This client address may not send to this source."


class PayloadTooLarge(RequestEntityTooLarge):
    pass


class WrongContentType(UnsupportedMediaType):
    pass


class SchemaViolation(UnprocessableEntity):
    """The body parsed but does not match the source's schema."""

    def __init__(self, message: str, fields: list[str], logged: list[str] | None = None) -> None:
        super().__init__(message)
        self.fields = fields
        # For the log and the audit: which fields, never their values, and only names the schema
        # declares (`logged`; a key the sender chose is `*`).
        self.reason = "schema violation at " + ", ".join(fields if logged is None else logged)


class RateLimited(TooManyRequests):
    """A rate-limit window for this source and client address is full."""

    def __init__(self, limit: str, retry_after: int) -> None:
        super().__init__(f"Rate limit exceeded ({limit}); retry after the time in Retry-After.")
        self.retry_after = retry_after


class StoreUnavailable(ServiceUnavailable):
    description = "The event store cannot accept events right now; retry shortly."

    def __init__(self, retry_after: int = 5) -> None:
        # A class attribute would not do: werkzeug's __init__ sets retry_after (None) on the instance.
        super().__init__(retry_after=retry_after)


def reason_of(error: HTTPException) -> str:
    """Why a request was refused, for the server's log (never the payload, never a secret)."""
    return str(getattr(error, "reason", None) or error.description or error.name)[:300]


def error_response(error: HTTPException) -> Response:
    """Render any HTTP exception in the one JSON error shape."""
    status = error.code or 500
    known = STATUSES.get(status)
    body: dict[str, Any] = {"error": known.error if known else "error", "message": error.description or ""}
    if isinstance(error, SchemaViolation):
        body["fields"] = error.fields
    response = jsonify(body)
    response.status_code = status
    for name, value in error.get_headers():
        if name.lower() not in ("content-type", "content-length"):
            response.headers[name] = value
    if isinstance(error, Unauthorized):
        response.headers["WWW-Authenticate"] = 'Bearer realm="webhook-server"'
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def init_app(app: Flask) -> None:
    """Every error, including 404/405 and anything unexpected, leaves as JSON."""

    @app.errorhandler(HTTPException)
    def _http(error: HTTPException) -> Response:
        g.reason = reason_of(error)  # the access log line carries it (ops.access)
        return error_response(error)

    def _store_down(error: Exception) -> Response:
        # A store error a view did not turn into a 503 itself (say, read before a stream began).
        app.logger.warning("the store did not answer: %s", type(error).__name__)
        g.reason = "the store did not answer"
        return error_response(StoreUnavailable())

    for store_error in STORE_ERRORS:
        app.register_error_handler(store_error, _store_down)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        app.logger.exception("unhandled error", exc_info=error)
        g.reason = f"unexpected error ({type(error).__name__})"  # its message could quote anything
        return error_response(InternalServerError("The server failed to handle this request."))
