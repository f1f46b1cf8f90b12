"""Turn a raw body into a payload, or a 400/415/422 with a reason."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from werkzeug.datastructures import Headers
from werkzeug.http import parse_options_header

from .errors import MalformedBody, SchemaViolation, WrongContentType

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
            raise MalformedBody(f"The form field {key!r} appears more than once.")
        form[key] = value
    check_structure(form)
    return form


def validate(validator: Draft202012Validator | None, payload: Any, particle: bool = False) -> None:
    """422 with the failing fields as JSON Pointers."""
    errors = sorted(validator.iter_errors(payload), key=lambda e: list(e.absolute_path)) if validator else []
    fields: list[str] = []
    messages = [_message(e) for e in errors[:5]]
    for error in errors:
        path = list(error.absolute_path)
        if error.validator == "required" and isinstance(error.instance, dict):
            missing = [name for name in error.validator_value if name not in error.instance]
            fields.extend(_pointer([*path, name]) for name in missing)
        else:
            fields.append(_pointer(path))
    # The schema checks the shape; this checks that the date exists (no month 13, no 24:00).
    if (
        particle
        and isinstance(payload, dict)
        and "/published_at" not in fields
        and not _real_time(payload.get("published_at"))
    ):
        fields.append("/published_at")
        messages.append("published_at is not an ISO 8601 date and time")
    if not fields:
        return
    fields = sorted(dict.fromkeys(fields))
    raise SchemaViolation("The payload does not match the schema: " + "; ".join(messages), fields)


def _message(error: ValidationError) -> str:
    if error.validator == "pattern":
        # The schema's pattern as compiled for Python (see sources.ecma_pattern) would confuse.
        where = _pointer(list(error.absolute_path)) or "the body"
        return f"{where} is not in the expected format"
    return str(error.message[:200])


def _real_time(value: Any) -> bool:
    if not isinstance(value, str):
        return True  # missing or of the wrong type: the schema reports it
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _pointer(path: list[Any]) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def particle_dedupe_key(payload: dict[str, Any]) -> str:
    """The same event, data, coreid and published_at is a redelivery, whatever the encoding."""
    data = payload.get("data")
    if data is None:
        data = ""
    elif not isinstance(data, str):
        data = json.dumps(data, sort_keys=True, separators=(",", ":"))
    identity = [payload["event"], data, str(payload["coreid"]).lower(), payload["published_at"]]
    return "p:" + hashlib.sha256(json.dumps(identity).encode()).hexdigest()
