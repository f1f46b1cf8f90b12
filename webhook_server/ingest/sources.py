"""Sources: the named ways in. Data, not code: a scheme, secrets, a schema and limits.

The two built-in sources come from the environment; more are declared in a TOML file
(`SOURCES_FILE`), checked against a JSON Schema (`schemas/sources-file.json`) and then for what
a schema cannot say (a rate limit that parses, a CIDR range, a secret that is set and long).
The same file declares the forwarding targets (`[targets.NAME]`, see `ingest.targets`).
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import ipaddress
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError

from webhook_server import values
from webhook_server.auth import SCHEMES
from webhook_server.ingest.targets import Target, load_targets
from webhook_server.ingest.validators import compile_schema, packaged_schema, packaged_validator

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
RESERVED_NAMES = frozenset({"particle", "generic"})
# `secret(name)`: the value of an environment variable (or NAME_FILE), None when unset; a
# value too short to be a secret is reported by it.
SecretReader = Callable[[str], str | None]


@dataclass(frozen=True)
class Source:
    """One way in, as the request path needs it."""

    name: str
    scheme: str
    secrets: tuple[str, ...]
    parser: str = "json"  # "json", or "particle" (form-encoded or JSON)
    validator: Draft202012Validator | None = None
    allow: tuple[IPNetwork, ...] = ()
    rate_limit: str | None = None
    max_payload_bytes: int | None = None
    recipients: tuple[str, ...] | None = None
    notify: bool = True
    signature_header: str | None = None
    secret_names: tuple[str, ...] = ()  # the variables the secrets came from
    events: tuple[str, ...] | None = None  # glob patterns on the event name; None: every event
    cooldown_seconds: int | None = None  # None: ALERT_COOLDOWN_SECONDS

    def notifies(self, event_name: str) -> bool:
        """True when this source notifies at all and the event's name passes its `events` filter."""
        if not self.notify:
            return False
        # Case-sensitive on every platform: event names are identifiers, not file names.
        return self.events is None or any(fnmatch.fnmatchcase(event_name, p) for p in self.events)

    def allows(self, address: str) -> bool:
        """True when there is no allow-list or the address is inside it."""
        if not self.allow:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.allow)


def builtin_sources(particle_secret: str | None, webhook_secret: str | None) -> dict[str, Source]:
    """`particle` and `generic`, each on only when its secret is set."""
    sources: dict[str, Source] = {}
    if particle_secret:
        sources["particle"] = Source(
            "particle",
            "bearer",
            (particle_secret,),
            parser="particle",
            validator=packaged_validator("particle.json"),
            secret_names=("PARTICLE_WEBHOOK_SECRET",),
        )
    if webhook_secret:
        sources["generic"] = Source(
            "generic",
            "hmac-sha256",
            (webhook_secret,),
            validator=packaged_validator("generic.json"),
            secret_names=("WEBHOOK_SECRET",),
        )
    return sources


@functools.cache
def file_validator() -> Draft202012Validator:
    """The SOURCES_FILE schema, with the schemes the registry knows."""
    schema = copy.deepcopy(packaged_schema("sources-file.json"))
    schema["$defs"]["source"]["properties"]["scheme"]["enum"] = list(SCHEMES)
    return Draft202012Validator(schema)


@dataclass(frozen=True)
class SourcesFile:
    """What a SOURCES_FILE declares: more sources, and the targets events are forwarded to."""

    sources: dict[str, Source]
    targets: dict[str, Target]


def load_sources_file(path: str, secret: SecretReader, problems: list[str], existing: dict[str, Source]) -> SourcesFile:
    """Parse a SOURCES_FILE; each problem names the file, the table and the key, never a value."""
    document = _read_toml(path, problems)
    if document is None:
        return SourcesFile({}, {})
    shape = _shape_problems(path, document)
    if shape:
        problems.extend(shape)
        return SourcesFile({}, {})
    sources = _file_sources(path, document.get("sources", {}), secret, problems, existing)
    # Declared names count even when a source has a problem of its own: that one is reported already.
    known = set(existing) | set(document.get("sources", {}))
    targets = load_targets(document.get("targets", {}), known, Path(path).parent, secret, problems, path)
    return SourcesFile(sources, targets)


def _file_sources(
    path: str, tables: dict[str, Any], secret: SecretReader, problems: list[str], existing: dict[str, Source]
) -> dict[str, Source]:
    """The `[sources.NAME]` tables, whose shape the schema has checked."""
    loaded = {}
    for name, spec in tables.items():
        where = f"SOURCES_FILE {path} [sources.{name}]"
        if name in RESERVED_NAMES or name in existing:
            problems.append(f"{where}: particle and generic are the built-in sources' names")
            continue
        source = _source(name, spec, Path(path).parent, secret, problems, where)
        if source is not None:
            loaded[name] = source
    return loaded


def _read_toml(path: str, problems: list[str]) -> dict[str, Any] | None:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"SOURCES_FILE cannot be read ({type(exc).__name__})")
    except tomllib.TOMLDecodeError as exc:
        # The parser's message gives the line and column, never the text there.
        problems.append(f"SOURCES_FILE {path} is not valid TOML: {exc}")
    return None


def _shape_problems(path: str, document: dict[str, Any]) -> list[str]:
    """What the JSON Schema finds, said by table and key."""
    found = []
    for error in sorted(file_validator().iter_errors(document), key=lambda e: list(map(str, e.absolute_path))):
        found.append(f"SOURCES_FILE {path}{_where(error)}: {_what(error)}")
    return list(dict.fromkeys(found))


def _where(error: ValidationError) -> str:
    parts = [str(part) for part in error.absolute_path]
    if len(parts) >= 2 and parts[0] in ("sources", "targets"):
        return f" [{parts[0]}.{parts[1]}]"
    return f" [{parts[0]}]" if parts else ""


def _what(error: ValidationError) -> str:
    parts = [str(part) for part in error.absolute_path]
    schema: dict[str, Any] = error.schema if isinstance(error.schema, dict) else {}
    instance: dict[str, Any] = error.instance if isinstance(error.instance, dict) else {}
    kind = "target" if parts and parts[0] == "targets" else "source"
    if error.validator == "additionalProperties":
        unknown = sorted(set(instance) - set(schema.get("properties", {})))
        what = "keys" if parts else "tables"
        only = " (only [sources.<name>] and [targets.<name>] are read)"
        return f"unknown {what} {', '.join(unknown)}" + ("" if parts else only)
    if error.validator == "required":
        missing = [k for k in schema.get("required", []) if k not in instance]
        return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required"
    # jsonschema reports a bad name as the `pattern` inside `propertyNames`, not as `propertyNames`.
    if "propertyNames" in error.relative_schema_path:
        return f"a {kind}'s name must be lowercase letters, digits, - or _"
    if not parts:  # an empty file
        return "must declare at least one [sources.<name>] or [targets.<name>] table"
    if error.validator == "minProperties" or (error.validator == "type" and len(parts) <= 1):
        return f"must declare at least one [{parts[0]}.<name>] table"
    key = parts[2] if len(parts) >= 3 else ""
    if key == "scheme" and kind == "source":
        return f"scheme must be one of {', '.join(SCHEMES)}"
    properties: dict[str, Any] = packaged_schema("sources-file.json")["$defs"][kind]["properties"]
    description = properties.get(key, {}).get("description")
    return f"{key} must be {description}" if description else "must be a table"


def _source(
    name: str, spec: dict[str, Any], base: Path, secret: SecretReader, problems: list[str], where: str
) -> Source | None:
    """One source whose shape the schema has checked; None (with problems) when it cannot be used."""
    before = len(problems)
    names = [spec["secrets"]] if isinstance(spec["secrets"], str) else list(spec["secrets"])
    secrets = _secrets(spec["scheme"], names, secret, problems, where)
    source = Source(
        name=name,
        scheme=spec["scheme"],
        secrets=tuple(secrets),
        validator=_schema(spec.get("schema"), base, problems, where),
        allow=_allow(spec.get("allow", []), problems, where),
        rate_limit=_checked(
            spec.get("rate_limit"), values.rate_limit, "rate_limit must be like 60/minute", problems, where
        ),
        max_payload_bytes=spec.get("max_payload_bytes"),
        recipients=_recipients(spec.get("recipients"), problems, where),
        notify=spec.get("notify", True),
        signature_header=spec.get("signature_header"),
        secret_names=tuple(names),
        events=tuple(spec["events"]) if "events" in spec else None,
        cooldown_seconds=_cooldown(spec.get("cooldown_seconds"), problems, where),
    )
    return source if len(problems) == before else None


def _secrets(scheme: str, names: list[str], secret: SecretReader, problems: list[str], where: str) -> list[str]:
    found = []
    for variable in names:
        value = secret(variable)
        if value is None:
            problems.append(f"{where}: secret variable {variable} is not set")
            continue
        problem = SCHEMES[scheme].secret_problem(value)
        if problem:
            problems.append(f"{where}: secret variable {variable} must be {problem}")
        found.append(value)
    return found


def _checked(value: Any, parse: Callable[[str], Any], message: str, problems: list[str], where: str) -> Any:
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError:
        problems.append(f"{where}: {message}")
        return None


def _cooldown(seconds: int | float | None, problems: list[str], where: str) -> int | None:
    """`cooldown_seconds` as a whole number, or None (with a problem for a float)."""
    # JSON Schema counts 300.0 as an integer; TOML says it is a float, and the key wants a whole number.
    if isinstance(seconds, float):
        problems.append(f"{where}: cooldown_seconds must be a whole number of seconds, 0 or more")
        return None
    return seconds


def _recipients(recipients: list[str] | None, problems: list[str], where: str) -> tuple[str, ...] | None:
    if recipients is None:
        return None
    try:
        return tuple(values.email_address(r) for r in recipients)
    except ValueError:
        problems.append(f"{where}: recipients must be a list of email addresses")
        return None


def _schema(schema: str | None, base: Path, problems: list[str], where: str) -> Draft202012Validator | None:
    if schema is None:
        return None
    path = Path(schema) if Path(schema).is_absolute() else base / schema
    try:
        return compile_schema(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, SchemaError) as exc:
        problems.append(f"{where}: schema {schema} is not a usable JSON Schema ({type(exc).__name__})")
        return None


def _allow(allow: list[str], problems: list[str], where: str) -> tuple[IPNetwork, ...]:
    networks = []
    for entry in allow:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            problems.append(f"{where}: allow entry {entry!r} is not an address or CIDR range")
    return tuple(networks)
