"""Parsers for the values of settings and of SOURCES_FILE keys: each returns the value or raises
`ValueError`, and never puts the text it was given in its message (it may be a secret)."""

from __future__ import annotations

import ipaddress
import re
import zoneinfo
from typing import Any

import psycopg
from limits import parse_many
from psycopg.conninfo import conninfo_to_dict

MIN_SECRET_LENGTH = 16
SECURITY_PORTS = {"starttls": 587, "ssl": 465, "none": 25}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Characters that have no place in a deliverable address, or that would let it inject headers.
ADDRESS_FORBIDDEN = frozenset(' <>,;"\\()[]')


def secret_problem(name: str, value: str) -> str | None:
    """Why `value` is no good as a secret, or None. Inner spaces are allowed: GitHub's own
    example secret is "It's a Secret to Everybody"."""
    if len(value) < MIN_SECRET_LENGTH:
        return f"{name} must be at least {MIN_SECRET_LENGTH} characters"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return f"{name} must not contain control characters"
    return None


def boolean(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("not a boolean")


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("not positive")
    return number


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("negative")
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("negative or not finite")
    return number


def positive_float(value: str) -> float:
    number = non_negative_float(value)
    if number == 0:
        raise ValueError("zero")
    return number


def timezone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (OSError, zoneinfo.ZoneInfoNotFoundError):  # "America" is a directory; a long name is too long
        raise ValueError("not a time zone") from None
    return value


def rate_limit(value: str) -> str:
    if not parse_many(value):
        raise ValueError("no rate limit")
    return value


def email_address(value: str) -> str:
    """One rule for every address, in the configuration and at send time alike."""
    local, at, domain = value.rpartition("@")
    if (
        not (local and at and "." in domain.strip(".") and "@" not in local)
        or len(value) > 254
        or any(c in ADDRESS_FORBIDDEN or not c.isprintable() for c in value)
    ):
        raise ValueError("not an email address")
    return value


def recipients(value: str) -> tuple[str, ...]:
    return tuple(email_address(part.strip()) for part in value.split(",") if part.strip())


def pairs(value: str) -> list[tuple[str, str]]:
    """`key:value` pairs, comma-separated."""
    found = []
    for part in value.split(","):
        if not part.strip():
            continue
        key, sep, rest = part.strip().partition(":")
        if not sep or not key.strip() or not rest.strip():
            raise ValueError("expected key:value")
        found.append((key.strip(), rest.strip()))
    return found


def device_names(value: str) -> dict[str, str]:
    return {key.lower(): name for key, name in pairs(value)}


def subscriber_tokens(value: str) -> dict[str, frozenset[str]]:
    """`token:channel` pairs; a token may appear in several. Tokens follow the secrets' rule."""
    tokens: dict[str, set[str]] = {}
    for token, channel in pairs(value):
        if secret_problem("token", token):
            raise ValueError("a token is too short or has control characters")
        tokens.setdefault(token, set()).add(channel)
    return {token: frozenset(channels) for token, channels in tokens.items()}


def host(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._:\[\]-]{1,253}", value):
        raise ValueError("not a host name")
    return value


def security(value: str) -> str:
    if value.lower() not in SECURITY_PORTS:
        raise ValueError("not a security mode")
    return value.lower()


def port(value: str) -> int:
    number = int(value)
    if not 0 < number < 65536:
        raise ValueError("not a port")
    return number


def log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise ValueError("not a log level")
    return value.upper()


def database_url(value: str) -> str:
    """A PostgreSQL connection URL that libpq can read. Its own message would quote the part it
    could not read, the password perhaps, so ours says only what to check."""
    if not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("not a PostgreSQL URL")
    try:
        parts = conninfo_to_dict(value)
    except psycopg.Error:
        parts = None
    if parts is None or not _plain_parts(parts):
        raise ValueError("not a URL libpq can read: percent-encode @ : / % [ ] in the password") from None
    return value


def _plain_parts(parts: dict[str, Any]) -> bool:
    """Whether host, port and database look like themselves: an unencoded / or @ in a password
    makes libpq read part of it as one of them (port "Sup3r"), and they are shown in places."""
    ports = str(parts.get("port") or "5432").split(",")
    hosts = str(parts.get("host") or "localhost").split(",")
    database = str(parts.get("dbname") or "")
    return (
        all(port.isdigit() for port in ports)
        and all("@" not in host and (host.startswith("/") or "/" not in host) for host in hosts)
        and "@" not in database
        and "/" not in database
    )


def redis_url(value: str) -> str:
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("not a Redis URL")
    return value


def is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False
