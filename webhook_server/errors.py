"""Errors that map to a status, and the one JSON error shape: {"error": code, "message": text}."""

from __future__ import annotations

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

# Machine-readable codes for werkzeug's own exceptions.
CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "schema_violation",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


class MalformedBody(BadRequest):
    code_name = "malformed_body"


class BadCredentials(Unauthorized):
    """Missing or wrong credentials. One message for every case: no hint of which part failed.

    `reason` says which part it was (a wrong token, a stale timestamp, a malformed signature
    header) for the server's log only; it never reaches the response.
    """

    code_name = "unauthorized"
    description = "Missing or invalid credentials."

    def __init__(self, reason: str = "missing or invalid credentials") -> None:
        super().__init__()
        self.reason = reason


class AddressNotAllowed(Forbidden):
    code_name = "forbidden"
    description = "This client address may not send to this source."


class PayloadTooLarge(RequestEntityTooLarge):
    code_name = "payload_too_large"


class WrongContentType(UnsupportedMediaType):
    code_name = "unsupported_media_type"


class SchemaViolation(UnprocessableEntity):
    """The body parsed but does not match the source's schema."""

    code_name = "schema_violation"

    def __init__(self, message: str, fields: list[str]) -> None:
        super().__init__(message)
        self.fields = fields
        # For the log: which fields, never their values.
        self.reason = "schema violation at " + ", ".join(fields)


class RateLimited(TooManyRequests):
    """A rate-limit window for this source and client address is full."""

    code_name = "rate_limited"

    def __init__(self, limit: str, retry_after: int) -> None:
        super().__init__(f"Rate limit exceeded ({limit}); retry after the time in Retry-After.")
        self.retry_after = retry_after


class StoreUnavailable(ServiceUnavailable):
    code_name = "unavailable"
    description = "The event store cannot accept events right now; retry shortly."
    retry_after = 5


def reason_of(error: HTTPException) -> str:
    """Why a request was refused, for the server's log (never the payload, never a secret)."""
    return str(getattr(error, "reason", None) or error.description or error.name)[:300]


def error_response(error: HTTPException) -> Response:
    """Render any HTTP exception in the one JSON error shape."""
    status = error.code or 500
    message = error.description or ""
    body: dict[str, Any] = {"error": getattr(error, "code_name", CODES.get(status, "error")), "message": message}
    if isinstance(error, SchemaViolation):
        body["fields"] = error.fields
    response = jsonify(body)
    response.status_code = status
    headers = error.get_headers()
    for name, value in headers:
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
        g.reason = reason_of(error)  # the access log line carries it (logs._log_request)
        return error_response(error)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        app.logger.exception("unhandled error", exc_info=error)
        return error_response(InternalServerError("The server failed to handle this request."))
