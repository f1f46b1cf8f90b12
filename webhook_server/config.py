"""Every setting, defined once: read from the environment (and `.env`), validated at start.

`load_settings()` either returns a complete `Settings` or raises `ConfigError` listing every
problem by variable name. Values are never echoed in messages, as they may be secrets.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import ssl
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from limits import parse_many

from .sources import SMS_GATEWAY_DOMAINS, Source, builtin_sources, load_sources_file

MIN_SECRET_LENGTH = 16

# Secrets checked against MIN_SECRET_LENGTH. SMTP_PASSWORD is a secret too but set by the
# mail provider, so it is exempt from the length rule (it still may come from a _FILE).
STRONG_SECRETS = ("PARTICLE_WEBHOOK_SECRET", "WEBHOOK_SECRET", "FLASK_SECRET_KEY", "METRICS_TOKEN")
SECRET_NAMES = (*STRONG_SECRETS, "SMTP_PASSWORD", "SUBSCRIBER_TOKENS", "REDIS_URL")

SECURITY_PORTS = {"starttls": 587, "ssl": 465, "none": 25}

# Every variable this server reads, to warn about a misspelled one (SMTP_EMIAL) that would
# otherwise be ignored without a word.
SETTING_NAMES = (
    "PARTICLE_WEBHOOK_SECRET",
    "WEBHOOK_SECRET",
    "SMTP_EMAIL",
    "SMTP_PASSWORD",
    "SMTP_HOST",
    "SMTP_PORT",
    "SMTP_SECURITY",
    "SMTP_CA_FILE",
    "SMTP_TIMEOUT",
    "RECIPIENT_EMAIL",
    "DEVICE_NAMES",
    "ALERT_TIMEZONE",
    "ALERT_COOLDOWN_SECONDS",
    "FLASK_SECRET_KEY",
    "DATA_DIR",
    "REDIS_URL",
    "SOURCES_FILE",
    "DISABLE_SYSTEM_INFO",
    "METRICS_TOKEN",
    "RATE_LIMIT",
    "MAX_PAYLOAD_BYTES",
    "TRUSTED_PROXIES",
    "RETRY_BASE_SECONDS",
    "RETRY_MAX_ATTEMPTS",
    "SUBSCRIBER_TOKENS",
    "DELIVERY_LEASE_SECONDS",
    "WORKER_POLL_SECONDS",
    "LOG_LEVEL",
)
# Read by the deployment around the app (Compose, Gunicorn's config, Prometheus), not by it.
DEPLOYMENT_NAMES = (
    "WEBHOOK_DOMAIN",
    "WEBHOOK_SERVER_IMAGE",
    "WEB_CONCURRENCY",
    "GUNICORN_THREADS",
    "PROMETHEUS_MULTIPROC_DIR",
)
# In the public contract, but not built in this version: said at start rather than ignored.
NOT_YET_NAMES = ("DATABASE_URL", "EVENT_RETENTION_DAYS", "AUDIT_RETENTION_DAYS")
# A variable starting with one of these is meant for us: an unknown one is likely a typo.
OUR_PREFIXES = (
    "PARTICLE_",
    "WEBHOOK_",
    "SMTP_",
    "RECIPIENT_",
    "DEVICE_",
    "ALERT_",
    "FLASK_",
    "REDIS_",
    "SOURCES_",
    "METRICS_",
    "RATE_LIMIT",
    "MAX_PAYLOAD",
    "TRUSTED_",
    "RETRY_",
    "SUBSCRIBER_",
    "DELIVERY_",
    "DISABLE_SYSTEM",
)


class ConfigError(Exception):
    """The configuration cannot be used; `problems` names each variable at fault."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    security: str
    username: str | None
    password: str | None
    sender: str
    ca_file: str | None
    timeout: float


@dataclass(frozen=True)
class Settings:
    """The validated configuration of one deployment."""

    sources: dict[str, Source]
    smtp: SmtpSettings | None
    recipients: tuple[str, ...]
    device_names: dict[str, str]
    alert_timezone: str
    flask_secret_key: str | None
    data_dir: Path
    redis_url: str | None
    disable_system_info: bool
    metrics_token: str | None
    rate_limit: str
    max_payload_bytes: int
    trusted_proxies: int
    alert_cooldown_seconds: float
    retry_base_seconds: float
    retry_max_attempts: int
    subscriber_tokens: dict[str, frozenset[str]]
    delivery_lease_seconds: float
    worker_poll_seconds: float
    log_level: str
    extra: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # said at start; nothing here stops the server

    @property
    def database_path(self) -> Path:
        return self.data_dir / "webhooks.sqlite3"

    def is_sms(self, address: str) -> bool:
        """True when the address is at a known email-to-SMS gateway."""
        return address.rsplit("@", 1)[-1].lower() in SMS_GATEWAY_DOMAINS


def read_environment(overrides: Mapping[str, Any] | None = None, env_file: str = ".env") -> dict[str, str]:
    """`.env`, then the process environment (which wins), then explicit overrides."""
    merged: dict[str, str] = {}
    if env_file and Path(env_file).is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ)
    for key, value in (overrides or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    return merged


class _Reader:
    """Reads raw values, resolving NAME_FILE, and collects problems instead of stopping."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        file_name = self.env.get(f"{name}_FILE")
        if value not in (None, "") and file_name not in (None, ""):
            self.problems.append(f"{name} and {name}_FILE are both set; use one")
            return None
        if file_name:
            try:
                text = Path(file_name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                self.problems.append(f"{name}_FILE cannot be read ({type(exc).__name__})")
                return None
            # One trailing line break, as editors and `echo` leave (LF, or CRLF from Windows).
            return text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text
        return value if value != "" else None

    def secret(self, name: str) -> str | None:
        value = self.raw(name)
        if value is not None and name in STRONG_SECRETS:
            check_secret(name, value, self.problems)
        return value

    def parsed(self, name: str, default: Any, parse: Callable[[str], Any], what: str) -> Any:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return parse(value.strip())
        except (ValueError, TypeError, zoneinfo.ZoneInfoNotFoundError):
            self.problems.append(f"{name} must be {what}")
            return default


def check_secret(name: str, value: str, problems: list[str]) -> None:
    """Secrets must be long and free of control characters.

    Inner spaces are allowed: GitHub's own example secret is "It's a Secret to Everybody".
    """
    if len(value) < MIN_SECRET_LENGTH:
        problems.append(f"{name} must be at least {MIN_SECRET_LENGTH} characters")
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        problems.append(f"{name} must not contain control characters")


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(value)
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError(value)
    return number


def _positive_float(value: str) -> float:
    number = _non_negative_float(value)
    if number == 0:
        raise ValueError(value)
    return number


def _timezone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except OSError:  # "America" is a directory, a very long name is too long for a path
        raise ValueError("not a time zone") from None
    return value


def _rate_limit(value: str) -> str:
    if not parse_many(value):
        raise ValueError(value)
    return value


def _email_address(value: str) -> str:
    local, at, domain = value.partition("@")
    if not (local and at and "." in domain) or any(c.isspace() or c in '<>,;"' for c in value):
        raise ValueError("not an email address")
    return value


def _recipients(value: str) -> tuple[str, ...]:
    return tuple(_email_address(part.strip()) for part in value.split(",") if part.strip())


def _pairs(value: str) -> list[tuple[str, str]]:
    pairs = []
    for part in value.split(","):
        if not part.strip():
            continue
        key, sep, rest = part.strip().partition(":")
        if not sep or not key.strip() or not rest.strip():
            raise ValueError("expected key:value")
        pairs.append((key.strip(), rest.strip()))
    return pairs


def _device_names(value: str) -> dict[str, str]:
    return {key.lower(): name for key, name in _pairs(value)}


def _subscriber_tokens(reader: _Reader) -> dict[str, frozenset[str]]:
    raw = reader.raw("SUBSCRIBER_TOKENS")
    if raw is None:
        return {}
    try:
        pairs = _pairs(raw)
    except ValueError:
        reader.problems.append("SUBSCRIBER_TOKENS must be token:channel pairs, comma-separated")
        return {}
    tokens: dict[str, set[str]] = {}
    for token, channel in pairs:
        check_secret("SUBSCRIBER_TOKENS (a token)", token, reader.problems)
        tokens.setdefault(token, set()).add(channel)
    return {token: frozenset(channels) for token, channels in tokens.items()}


def _smtp(reader: _Reader) -> SmtpSettings | None:
    email = reader.parsed("SMTP_EMAIL", None, _email_address, "an email address")
    host = reader.parsed("SMTP_HOST", None, _host, "a host name or IP address")
    security = reader.parsed("SMTP_SECURITY", "starttls", _security, "starttls, ssl or none")
    port = reader.parsed("SMTP_PORT", SECURITY_PORTS[security], _port, "a port number (1-65535)")
    password = reader.secret("SMTP_PASSWORD")
    ca_file = reader.raw("SMTP_CA_FILE")
    timeout = reader.parsed("SMTP_TIMEOUT", 15.0, _positive_float, "a number of seconds")
    if ca_file:
        _check_ca_file(ca_file, reader.problems)
    if email is None and host is None:
        if password:
            reader.problems.append("SMTP_PASSWORD is set but neither SMTP_EMAIL nor SMTP_HOST is")
        return None
    host = (host or "smtp.gmail.com").strip()
    if password and email is None:
        reader.problems.append("SMTP_PASSWORD needs SMTP_EMAIL, which is the login")
    if password and security == "none" and not _is_loopback(host):
        reader.problems.append(
            "SMTP_PASSWORD with SMTP_SECURITY=none would send the password in clear; use starttls or ssl"
        )
    return SmtpSettings(
        host=host,
        port=port,
        security=security,
        username=email if password else None,
        password=password,
        sender=email or f"webhook-server@{socket.gethostname()}",
        ca_file=ca_file,
        timeout=timeout,
    )


def _check_ca_file(path: str, problems: list[str]) -> None:
    """The CA bundle must load, or the worker would fail at its first send."""
    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        problems.append("SMTP_CA_FILE does not name a readable file")
    except (OSError, ssl.SSLError, ValueError):
        problems.append("SMTP_CA_FILE is not a PEM CA bundle")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._:\[\]-]{1,253}", value):
        raise ValueError("not a host name")
    return value


def _security(value: str) -> str:
    if value.lower() not in SECURITY_PORTS:
        raise ValueError(value)
    return value.lower()


def _port(value: str) -> int:
    port = int(value)
    if not 0 < port < 65536:
        raise ValueError(value)
    return port


def load_settings(env: Mapping[str, str]) -> Settings:
    """Validate `env` (see `read_environment`) into `Settings`, or raise `ConfigError`."""
    reader = _Reader(env)
    rate_limit = reader.parsed(
        "RATE_LIMIT", "60/minute;20/second", _rate_limit, "a rate limit such as 60/minute;20/second"
    )
    max_payload = reader.parsed("MAX_PAYLOAD_BYTES", 1048576, _positive_int, "a positive whole number")
    sources = builtin_sources(
        particle_secret=reader.secret("PARTICLE_WEBHOOK_SECRET"),
        webhook_secret=reader.secret("WEBHOOK_SECRET"),
    )
    sources_file = reader.raw("SOURCES_FILE")
    if sources_file:
        sources.update(load_sources_file(sources_file, reader.raw, reader.problems, sources))
    if not sources and not reader.problems:
        reader.problems.append(
            "no source is enabled: set PARTICLE_WEBHOOK_SECRET, WEBHOOK_SECRET or SOURCES_FILE "
            "(`webhook-server init` writes a .env with fresh secrets)"
        )
    smtp = _smtp(reader)
    recipients = reader.parsed("RECIPIENT_EMAIL", None, _recipients, "comma-separated email addresses")
    if smtp and recipients == ():  # set, but only commas and spaces
        reader.problems.append("RECIPIENT_EMAIL must name at least one address when SMTP is configured")
    elif smtp and recipients is None and reader.raw("RECIPIENT_EMAIL") is None:
        reader.problems.append("RECIPIENT_EMAIL is required when SMTP is configured")
    recipients = recipients or ()
    settings = Settings(
        sources=sources,
        smtp=smtp,
        recipients=recipients,
        device_names=reader.parsed("DEVICE_NAMES", {}, _device_names, "coreid:Name pairs, comma-separated"),
        alert_timezone=reader.parsed("ALERT_TIMEZONE", "UTC", _timezone, "an IANA time zone such as Europe/Paris"),
        flask_secret_key=reader.secret("FLASK_SECRET_KEY"),
        data_dir=Path(reader.raw("DATA_DIR") or "./data"),
        redis_url=reader.raw("REDIS_URL"),
        disable_system_info=reader.parsed("DISABLE_SYSTEM_INFO", False, _bool, "true or false"),
        metrics_token=reader.secret("METRICS_TOKEN"),
        rate_limit=rate_limit,
        max_payload_bytes=max_payload,
        trusted_proxies=reader.parsed("TRUSTED_PROXIES", 0, _non_negative_int, "a whole number (0 or more)"),
        alert_cooldown_seconds=reader.parsed(
            "ALERT_COOLDOWN_SECONDS", 60.0, _non_negative_float, "a number of seconds, 0 or more"
        ),
        retry_base_seconds=reader.parsed("RETRY_BASE_SECONDS", 2.0, _positive_float, "a positive number of seconds"),
        retry_max_attempts=reader.parsed("RETRY_MAX_ATTEMPTS", 12, _positive_int, "a positive whole number"),
        subscriber_tokens=_subscriber_tokens(reader),
        delivery_lease_seconds=reader.parsed(
            # A send may take several SMTP timeouts (connect, TLS, each command): the lease must outlast it.
            "DELIVERY_LEASE_SECONDS",
            max(60.0, 4 * smtp.timeout) if smtp else 60.0,
            _positive_float,
            "a positive number of seconds",
        ),
        worker_poll_seconds=reader.parsed("WORKER_POLL_SECONDS", 0.2, _positive_float, "a positive number of seconds"),
        log_level=reader.parsed("LOG_LEVEL", "INFO", _log_level, "DEBUG, INFO, WARNING or ERROR"),
    )
    if settings.redis_url and not settings.redis_url.startswith(("redis://", "rediss://", "unix://")):
        reader.problems.append("REDIS_URL must start with redis://, rediss:// or unix://")
    if reader.problems:
        raise ConfigError(reader.problems)
    referenced = {name for source in sources.values() for name in source.secret_names}
    return replace(settings, warnings=unknown_name_warnings(env, referenced))


def unknown_name_warnings(env: Mapping[str, str], referenced: set[str]) -> tuple[str, ...]:
    """A warning for each variable that looks meant for us but is not read (a typo, mostly)."""
    known = set(SETTING_NAMES) | set(DEPLOYMENT_NAMES) | referenced
    known |= {f"{name}_FILE" for name in known}
    warnings = []
    for name in sorted(env):
        if name in NOT_YET_NAMES and env[name]:
            warnings.append(f"{name} is not used by this version yet; it is ignored")
        elif name.startswith(OUR_PREFIXES) and name not in known:
            close = difflib.get_close_matches(name.removesuffix("_FILE"), SETTING_NAMES, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            warnings.append(f"{name} is not a setting and is ignored{hint}")
    return tuple(warnings)


def _log_level(value: str) -> str:
    if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(value)
    return value.upper()


def settings_from_environment(overrides: Mapping[str, Any] | None = None) -> Settings:
    """The usual entry point: `.env` + environment + overrides, validated."""
    return load_settings(read_environment(overrides))
