"""Checking a payload against its source's schema: failures as 422 with the failing fields as
JSON Pointers (the validators are built at start, in `ingest.validators`)."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from webhook_server.errors import SchemaViolation


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
    named = declared_names(validator.schema) if validator else frozenset()
    logged = sorted(dict.fromkeys(_schema_pointer(field, named) for field in fields))
    raise SchemaViolation("The payload does not match the schema: " + "; ".join(messages), fields, logged)


@functools.cache
def _declared(schema_text: str) -> frozenset[str]:
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in ("properties", "required"):
                value = node.get(key)
                names.update(value if isinstance(value, list) else value or {})
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(json.loads(schema_text))
    return frozenset(n for n in names if isinstance(n, str))


def declared_names(schema: Any) -> frozenset[str]:
    """Every property name the schema itself declares (its `properties` and `required`)."""
    return _declared(json.dumps(schema, sort_keys=True, default=str))


def _schema_pointer(pointer: str, named: frozenset[str]) -> str:
    """`pointer` for the log and the audit: a key the schema does not declare is the sender's
    own text, so it becomes `*` (array indices stay)."""
    parts = pointer.split("/")[1:]
    kept = [p if p.isdigit() or p.replace("~1", "/").replace("~0", "~") in named else "*" for p in parts]
    return "".join("/" + p for p in kept)


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
