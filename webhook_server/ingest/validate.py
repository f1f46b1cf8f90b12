"""JSON Schema validation of payloads: validators compiled once at start, failures as 422 with
the failing fields as JSON Pointers."""

from __future__ import annotations

import json
from datetime import datetime
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from webhook_server.errors import SchemaViolation


def packaged_schema(name: str) -> dict[str, Any]:
    """A schema shipped in `webhook_server/schemas/`."""
    text = resources.files("webhook_server.schemas").joinpath(name).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def packaged_validator(name: str) -> Draft202012Validator:
    """A validator for a schema shipped in `webhook_server/schemas/`."""
    return compile_schema(packaged_schema(name))


def ecma_pattern(pattern: str) -> str:
    """`pattern` with each bare `$` made `\\Z`: in JSON Schema (ECMA-262) `$` is the end of the
    text, in Python it also matches before a final newline, so "api\\n" would pass "^api$"."""
    out: list[str] = []
    escaped = in_class = False
    for ch in pattern:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "[":
            in_class = True
        elif ch == "]":
            in_class = False
        elif ch == "$" and not in_class:
            out.append("\\Z")
            continue
        out.append(ch)
    return "".join(out)


# Keywords whose values are data, not schemas: a "pattern" key inside them is left alone.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})


def _python_patterns(schema: Any) -> Any:
    """A copy of `schema` whose `pattern`/`patternProperties` regexes mean in Python what they
    mean in JSON Schema."""
    if isinstance(schema, list):
        return [_python_patterns(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    copy: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "pattern" and isinstance(value, str):
            copy[key] = ecma_pattern(value)
        elif key == "patternProperties" and isinstance(value, dict):
            copy[key] = {ecma_pattern(k): _python_patterns(v) for k, v in value.items()}
        elif key in _DATA_KEYWORDS:
            copy[key] = value
        else:
            copy[key] = _python_patterns(value)
    return copy


def compile_schema(schema: dict[str, Any]) -> Draft202012Validator:
    """A validator for `schema`, checked first (SchemaError for a bad one); built once, at start."""
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(_python_patterns(schema), format_checker=Draft202012Validator.FORMAT_CHECKER)


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
