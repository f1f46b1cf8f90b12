"""Read a raw body within its limit and turn it into a payload, or a 413/415/400 with a reason."""

from __future__ import annotations

import json
import math
from typing import Any
from urllib.parse import parse_qsl

from werkzeug.datastructures import Headers
from werkzeug.http import parse_options_header
from werkzeug.wrappers import Request

from webhook_server.errors import MalformedBody, PayloadTooLarge, WrongContentType

MAX_DEPTH = 64
MAX_FORM_FIELDS = 100
FORM = "application/x-www-form-urlencoded"


def media_type(headers: Headers) -> str:
    mimetype, _ = parse_options_header(headers.get("Content-Type", ""))
    return mimetype.lower()


def is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def require_media_type(headers: Headers, allow_form: bool) -> str:
    """415 unless the body is JSON (or form-encoded, where the source takes it)."""
    mimetype = media_type(headers)
    if is_json(mimetype) or (allow_form and mimetype == FORM):
        return mimetype
    accepted = "application/json" + (f" or {FORM}" if allow_form else "")
    raise WrongContentType(f"Content-Type must be {accepted}.")


def _reject_constant(name: str) -> Any:
    raise MalformedBody(f"JSON must not contain {name}.")


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedBody("The body is not valid UTF-8.") from None


def _finite_float(text: str) -> float:
    # 1e999 is valid JSON but becomes inf, which would be stored and sent on as `Infinity`.
    value = float(text)
    if not math.isfinite(value):
        raise MalformedBody("JSON contains a number out of range.")
    return value


def parse_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, finite numbers, bounded depth, no lone surrogates or NULs."""
    try:
        value = json.loads(_text(body), parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise MalformedBody(f"JSON is nested deeper than {MAX_DEPTH} levels.") from None
    except ValueError as exc:
        raise MalformedBody(f"The body is not valid JSON: {exc}.") from None
    check_structure(value)
    return value


def check_structure(value: Any) -> None:
    """Depth and text checks, iteratively: a deep document must not exhaust the stack."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > MAX_DEPTH:
                raise MalformedBody(f"JSON is nested deeper than {MAX_DEPTH} levels.")
            for key, child in item.items():
                _check_text(key)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth > MAX_DEPTH:
                raise MalformedBody(f"JSON is nested deeper than {MAX_DEPTH} levels.")
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            _check_text(item)


def _check_text(text: str) -> None:
    # A lone surrogate ("\ud800") parses in Python but cannot be stored or re-encoded.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedBody("JSON text contains an unpaired surrogate.") from None
    if "\x00" in text:
        raise MalformedBody("JSON text contains a NUL character.")


def parse_form(body: bytes) -> dict[str, str]:
    """A form body as a flat dict; a repeated field is malformed."""
    try:
        pairs = parse_qsl(
            _text(body),
            keep_blank_values=True,
            strict_parsing=bool(body),
            max_num_fields=MAX_FORM_FIELDS,
            errors="strict",
        )
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedBody(f"The form body is malformed: {type(exc).__name__}.") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            # The field's name stays out: it is the sender's text, and the reason goes to the log.
            raise MalformedBody("A form field appears more than once.")
        form[key] = value
    check_structure(form)
    return form


def read_body(request: Request, limit: int) -> bytes:
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


def parse_payload(headers: Headers, body: bytes, particle: bool) -> Any:
    """The payload: JSON, or a form (Particle's default, or GitHub's `payload=<json>` option)."""
    mimetype = require_media_type(headers, allow_form=True)
    if mimetype != FORM:
        return parse_json(body)
    form = parse_form(body)
    if particle:
        return form
    # GitHub's form option wraps the JSON document in a `payload` field.
    if set(form) != {"payload"}:
        raise MalformedBody("A form-encoded body must carry the JSON document in a 'payload' field.")
    return parse_json(form["payload"].encode())
