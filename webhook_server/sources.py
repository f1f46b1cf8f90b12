"""Sources: the named ways in. Data, not code: a scheme, secrets, a schema and limits.

The two built-in sources come from the environment; more are declared in a TOML file
(`SOURCES_FILE`). Schemas are compiled into validators once, here, at start.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from limits import parse_many

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Email-to-SMS gateways of North American and a few other carriers: an address at one of
# these gets the short plain-text form.
SMS_GATEWAY_DOMAINS = frozenset(
    {
        "vtext.com",
        "vzwpix.com",
        "txt.att.net",
        "mms.att.net",
        "tmomail.net",
        "messaging.sprintpcs.com",
        "pm.sprint.com",
        "msg.fi.google.com",
        "sms.myboostmobile.com",
        "myboostmobile.com",
        "sms.cricketwireless.net",
        "mms.cricketwireless.net",
        "email.uscc.net",
        "vmobl.com",
        "mymetropcs.com",
        "text.republicwireless.com",
        "mailmymobile.net",
        "sms.rogers.com",
        "txt.bell.ca",
        "msg.telus.com",
        "txt.freedommobile.ca",
        "pcs.rogers.com",
        "txt.bellmobility.ca",
        "sms.alltelwireless.com",
        "message.ting.com",
        "textmsg.uscellular.com",
        "mmst5.tracfone.com",
        "cspire1.com",
        "sms.ntwls.net",
    }
)

SCHEMES = (
    "bearer",
    "basic",
    "hmac-sha256",
    "hmac-sha1",
    "hmac-sha512",
    "standard-webhooks",
    "stripe",
    "slack",
    "shopify",
)
RESERVED_NAMES = frozenset({"particle", "generic"})
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


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
    secret_names: tuple[str, ...] = ()  # the variables the secrets came from (SOURCES_FILE)

    def allows(self, address: str) -> bool:
        """True when there is no allow-list or the address is inside it."""
        if not self.allow:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.allow)


def packaged_validator(name: str) -> Draft202012Validator:
    """A validator for a schema shipped in `webhook_server/schemas/`."""
    text = resources.files("webhook_server.schemas").joinpath(name).read_text(encoding="utf-8")
    return _validator(json.loads(text))


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


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(_python_patterns(schema), format_checker=Draft202012Validator.FORMAT_CHECKER)


def builtin_sources(particle_secret: str | None, webhook_secret: str | None) -> dict[str, Source]:
    """`particle` and `generic`, each on only when its secret is set."""
    sources: dict[str, Source] = {}
    if particle_secret:
        sources["particle"] = Source(
            name="particle",
            scheme="bearer",
            secrets=(particle_secret,),
            parser="particle",
            validator=packaged_validator("particle.json"),
        )
    if webhook_secret:
        sources["generic"] = Source(
            name="generic",
            scheme="hmac-sha256",
            secrets=(webhook_secret,),
            validator=packaged_validator("generic.json"),
        )
    return sources


def load_sources_file(
    path: str,
    raw: Callable[[str], str | None],
    problems: list[str],
    existing: dict[str, Source],
) -> dict[str, Source]:
    """Parse a SOURCES_FILE; secrets are named environment variables, read through `raw`."""
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"SOURCES_FILE cannot be read ({type(exc).__name__})")
        return {}
    except tomllib.TOMLDecodeError as exc:
        # The parser's message gives the line and column, never the text there.
        problems.append(f"SOURCES_FILE is not valid TOML: {exc}")
        return {}
    unknown = sorted(set(document) - KNOWN_TABLES)
    if unknown:
        # A [source.x] typo would otherwise lose a whole source without a word.
        problems.append(f"SOURCES_FILE: unknown tables {', '.join(unknown)} (only [sources.<name>] is read)")
    if "targets" in document:
        problems.append("SOURCES_FILE [targets]: forwarding targets are not built in this version yet")
    table = document.get("sources")
    if not isinstance(table, dict) or not table:
        problems.append("SOURCES_FILE must declare at least one [sources.<name>] table")
        return {}
    loaded: dict[str, Source] = {}
    for name, spec in table.items():
        where = f"SOURCES_FILE [sources.{name}]"
        if not NAME_PATTERN.match(name) or name in RESERVED_NAMES or name in existing:
            problems.append(f"{where}: the name must be lowercase letters, digits, - or _, and not particle or generic")
            continue
        if not isinstance(spec, dict):
            problems.append(f"{where} must be a table")
            continue
        source = _source_from_spec(name, spec, Path(path).parent, raw, problems, where)
        if source is not None:
            loaded[name] = source
    return loaded


KNOWN_TABLES = frozenset({"sources", "targets"})
KNOWN_KEYS = frozenset(
    {
        "scheme",
        "secrets",
        "schema",
        "allow",
        "rate_limit",
        "max_payload_bytes",
        "recipients",
        "notify",
        "signature_header",
    }
)


def _source_from_spec(
    name: str,
    spec: dict[str, Any],
    base: Path,
    raw: Callable[[str], str | None],
    problems: list[str],
    where: str,
) -> Source | None:
    from .config import check_secret  # config imports this module; the cycle is broken here

    before = len(problems)
    unknown = sorted(set(spec) - KNOWN_KEYS)
    if unknown:
        problems.append(f"{where}: unknown keys {', '.join(unknown)}")
    scheme = spec.get("scheme")
    if scheme not in SCHEMES:
        problems.append(f"{where}: scheme must be one of {', '.join(SCHEMES)}")
    names = spec.get("secrets")
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        problems.append(f"{where}: secrets must list the environment variables that hold its secrets")
        names = []
    secrets = []
    for variable in names:
        value = raw(variable)
        if value is None:
            problems.append(f"{where}: secret variable {variable} is not set")
        else:
            check_secret(variable, value, problems)
            if scheme == "standard-webhooks" and not _standard_webhooks_secret(value):
                problems.append(f"{where}: secret variable {variable} must be whsec_ followed by base64")
            secrets.append(value)
    validator = _spec_validator(spec.get("schema"), base, problems, where)
    allow = _spec_allow(spec.get("allow", []), problems, where)
    rate_limit = spec.get("rate_limit")
    if rate_limit is not None and (not isinstance(rate_limit, str) or not _valid_rate(rate_limit)):
        problems.append(f"{where}: rate_limit must be like 60/minute")
    limit = spec.get("max_payload_bytes")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        problems.append(f"{where}: max_payload_bytes must be a positive whole number")
    recipients = spec.get("recipients")
    if recipients is not None and (
        not isinstance(recipients, list) or not all(isinstance(r, str) and _is_address(r) for r in recipients)
    ):
        problems.append(f"{where}: recipients must be a list of email addresses")
    notify = spec.get("notify", True)
    if not isinstance(notify, bool):
        problems.append(f"{where}: notify must be true or false")
    header = spec.get("signature_header")
    if header is not None and not (isinstance(header, str) and re.fullmatch(r"[A-Za-z0-9-]+", header)):
        problems.append(f"{where}: signature_header must be a header name")
    if len(problems) > before:
        return None
    return Source(
        name=name,
        scheme=str(scheme),
        secrets=tuple(secrets),
        validator=validator,
        allow=allow,
        rate_limit=rate_limit,
        max_payload_bytes=limit,
        recipients=tuple(recipients) if recipients is not None else None,
        notify=notify,
        signature_header=header,
        secret_names=tuple(names),
    )


def _standard_webhooks_secret(value: str) -> bool:
    """`whsec_<base64>`: anything else would be decoded into some other key and never match."""
    encoded = value.removeprefix("whsec_")
    try:
        return bool(base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True))
    except (binascii.Error, ValueError):
        return False


def _is_address(value: str) -> bool:
    from .config import _email_address  # one definition of a valid address, in config

    try:
        _email_address(value)
    except ValueError:
        return False
    return True


def _valid_rate(value: str) -> bool:
    try:
        return bool(parse_many(value))
    except ValueError:
        return False


def _spec_validator(schema: Any, base: Path, problems: list[str], where: str) -> Draft202012Validator | None:
    if schema is None:
        return None
    if not isinstance(schema, str):
        problems.append(f"{where}: schema must be a path to a JSON Schema file")
        return None
    path = (base / schema) if not Path(schema).is_absolute() else Path(schema)
    try:
        return _validator(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, SchemaError) as exc:
        problems.append(f"{where}: schema {schema} is not a usable JSON Schema ({type(exc).__name__})")
        return None


def _spec_allow(allow: Any, problems: list[str], where: str) -> tuple[IPNetwork, ...]:
    if not isinstance(allow, list):
        problems.append(f"{where}: allow must be a list of addresses or CIDR ranges")
        return ()
    networks = []
    for entry in allow:
        try:
            networks.append(ipaddress.ip_network(str(entry), strict=False))
        except ValueError:
            problems.append(f"{where}: allow entry {entry!r} is not an address or CIDR range")
    return tuple(networks)
