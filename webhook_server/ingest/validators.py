"""JSON Schema validators, built once at start: the packaged schemas and those SOURCES_FILE names.

Building a validator checks the schema (`SchemaError` for a bad one); building one per request
cost four fifths of the throughput here (../shared/PITFALLS.md).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator


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
