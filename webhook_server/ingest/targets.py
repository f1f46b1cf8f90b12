"""Forwarding targets: the `[targets.NAME]` tables of SOURCES_FILE, as the worker needs them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.exceptions import UnsupportedAlgorithm
from jwcrypto import jwk
from jwcrypto.common import base64url_decode

from webhook_server.auth import standard_webhooks_secret_problem

BODIES = ("event", "payload")
DEFAULT_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Target:
    """One HTTP endpoint that accepted events are passed on to, signed per Standard Webhooks."""

    name: str
    url: str  # never logged: it may carry a token
    secret: str  # whsec_<base64>, signs every request
    sources: tuple[str, ...] = ("*",)  # source names, or "*" for every one
    events: tuple[str, ...] | None = None  # glob patterns on the event name; None: every event
    encrypt_to: Any = None  # a jwcrypto JWK (RSA public key): the body becomes a JWE
    ordered: bool = False  # one at a time, in event id order
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    body: str = "event"  # "event" (the event JSON) or "payload" (the body as received)
    secret_name: str = ""  # the variable the secret came from

    def takes(self, source: str, event: str) -> bool:
        """True when an event of `source` named `event` is forwarded here."""
        if "*" not in self.sources and source not in self.sources:
            return False
        return self.events is None or any(fnmatchcase(event, pattern) for pattern in self.events)


# -- reading `[targets.NAME]` tables ------------------------------------------------------------

MIN_RSA_BITS = 2048
# `secret(name)`: the value of an environment variable (or NAME_FILE), None when unset; a value
# too short to be a secret is reported by it (as for the sources' secrets).
SecretReader = Callable[[str], str | None]


def load_targets(
    tables: dict[str, Any], known_sources: set[str], base: Path, secret: SecretReader, problems: list[str], file: str
) -> dict[str, Target]:
    """The targets of tables the JSON Schema has checked; each problem names the file, table and key."""
    loaded = {}
    for name, spec in tables.items():
        where = f"SOURCES_FILE {file} [targets.{name}]"
        target = _target(name, spec, known_sources, base, secret, problems, where)
        if target is not None:
            loaded[name] = target
    return loaded


def _target(
    name: str,
    spec: dict[str, Any],
    known_sources: set[str],
    base: Path,
    secret: SecretReader,
    problems: list[str],
    where: str,
) -> Target | None:
    """One target, or None (with problems) when it cannot be used."""
    before = len(problems)
    _check_url(spec["url"], problems, where)
    _check_sources(spec["sources"], known_sources, problems, where)
    target = Target(
        name=name,
        url=spec["url"],
        secret=_signing_secret(spec["secret"], secret, problems, where) or "",
        sources=tuple(spec["sources"]),
        events=tuple(spec["events"]) if "events" in spec else None,
        encrypt_to=_public_key(spec["encrypt_to"], base, problems, where) if "encrypt_to" in spec else None,
        ordered=spec.get("ordered", False),
        timeout_seconds=float(spec.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)),
        body=spec.get("body", "event"),
        secret_name=spec["secret"],
    )
    return target if len(problems) == before else None


def _check_url(url: str, problems: list[str], where: str) -> None:
    """An absolute http(s) URL with a host; the message never quotes it, as it may carry a token."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number in range
        usable = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        usable = False
    # Spaces or control characters would be sent as they are, or refused by the HTTP client later.
    if not usable or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        problems.append(f"{where}: url must be an absolute http:// or https:// URL with a host")


def _check_sources(names: list[str], known_sources: set[str], problems: list[str], where: str) -> None:
    """Each name must be a source that is on, or "*": a typo would silently forward nothing."""
    for source in dict.fromkeys(names):
        if source != "*" and source not in known_sources:
            problems.append(
                f"{where}: sources names {source}, which is not a source here"
                " (particle and generic count only when their secret is set)"
            )


def _signing_secret(variable: str, secret: SecretReader, problems: list[str], where: str) -> str | None:
    """The `whsec_<base64>` key the variable holds; problems name the variable, never the value."""
    value = secret(variable)
    if value is None:
        problems.append(f"{where}: secret variable {variable} is not set")
        return None
    # Without the prefix a receiver's library would read the text some other way and never match.
    problem = "whsec_ followed by base64" if not value.startswith("whsec_") else standard_webhooks_secret_problem(value)
    if problem:
        problems.append(f"{where}: secret variable {variable} must be {problem}")
        return None
    return value


def _public_key(path_text: str, base: Path, problems: list[str], where: str) -> Any:
    """The RSA public key (a jwcrypto JWK) of at least 2048 bits in a PEM file, or None with a problem."""
    path = Path(path_text) if Path(path_text).is_absolute() else base / path_text
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.append(f"{where}: encrypt_to {path_text} cannot be read ({type(exc).__name__})")
        return None
    said = f"{where}: encrypt_to {path_text}"
    # Checked before parsing: an encrypted private key would otherwise just fail as "no password".
    if b"PRIVATE KEY-----" in data:
        problems.append(f"{said} is a private key; it must be the receiver's public key (never copy the private key)")
        return None
    try:
        key = jwk.JWK.from_pem(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        problems.append(f"{said} is not a PEM public key")
        return None
    if key.get("kty") != "RSA":
        problems.append(f"{said} must be an RSA public key (RSA-OAEP-256 wraps the content key)")
    elif key.has_private:
        problems.append(f"{said} is a private key; it must be the receiver's public key (never copy the private key)")
    elif int.from_bytes(base64url_decode(key["n"]), "big").bit_length() < MIN_RSA_BITS:
        problems.append(f"{said} must be an RSA key of at least {MIN_RSA_BITS} bits")
    else:
        return key
    return None


def origin(url: str) -> str:
    """`scheme://host[:port]` of a target URL: what may be shown (no user, path or query)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
