"""Every setting, declared once in `SETTINGS`: its name, default, parser, whether it is a secret,
and one line of help. `load_settings` reads through the table, `webhook-server init` writes its
`.env` from it, and the tests hold `.env.example` and the README's table to it.

`load_settings()` either returns a complete `Settings` or raises `ConfigError` listing every
problem by variable name. Values are never echoed in messages, as they may be secrets.
"""

from __future__ import annotations

import difflib
import os
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from webhook_server import values as v
from webhook_server.ingest.sources import Source, builtin_sources, load_sources_file
from webhook_server.ingest.targets import Target


class ConfigError(Exception):
    """The configuration cannot be used; `problems` names each variable at fault."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Setting:
    """One environment variable. `expects` completes "NAME must be ..." when `parse` refuses."""

    name: str
    help: str
    default: Any = None  # when unset; None for "not set" (a composite may then decide)
    parse: Callable[[str], Any] | None = None  # None: the text as given
    expects: str = ""
    secret: bool = False  # never shown; held to the 16-character rule when `strong`
    strong: bool = False
    field: str | None = None  # the `Settings` attribute it fills by itself, if any
    init: str | None = None  # in the .env `init` writes: "secret" (fresh), "value" or "comment"
    example: str = ""  # the value `init` and .env.example show, where it is not the default


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "PARTICLE_WEBHOOK_SECRET",
        "bearer token Particle sends as `Authorization: Bearer <secret>`",
        secret=True,
        strong=True,
        init="secret",
    ),
    Setting(
        "WEBHOOK_SECRET",
        "HMAC-SHA256 key for generic senders (X-Hub-Signature-256)",
        secret=True,
        strong=True,
        init="secret",
    ),
    Setting(
        "FLASK_SECRET_KEY",
        "signs anything kept in a cookie; unset: a key kept in DATA_DIR",
        secret=True,
        strong=True,
        field="flask_secret_key",
        init="secret",
    ),
    Setting("SOURCES_FILE", "TOML file declaring more sources"),
    Setting(
        "SMTP_EMAIL",
        "SMTP login and From address",
        parse=v.email_address,
        expects="an email address",
        init="comment",
        example="you@gmail.com",
    ),
    Setting(
        "SMTP_PASSWORD",
        "SMTP password (a Gmail app password); without it no login",
        secret=True,
        init="comment",
        example="your-app-password",
    ),
    Setting(
        "SMTP_HOST",
        "SMTP server; smtp.gmail.com when only SMTP_EMAIL is set",
        parse=v.host,
        expects="a host name or IP address",
    ),
    Setting("SMTP_SECURITY", "starttls, ssl or none", "starttls", v.security, "starttls, ssl or none"),
    Setting(
        "SMTP_PORT", "SMTP port; 587, 465 or 25 to match SMTP_SECURITY", parse=v.port, expects="a port number (1-65535)"
    ),
    Setting("SMTP_CA_FILE", "CA bundle for an SMTP server with a private certificate"),
    Setting(
        "SMTP_TIMEOUT",
        "seconds before an SMTP connection or command fails (temporarily)",
        15.0,
        v.positive_float,
        "a number of seconds",
    ),
    Setting(
        "RECIPIENT_EMAIL",
        "comma-separated recipients; email-to-SMS gateway addresses get the SMS form",
        parse=v.recipients,
        expects="comma-separated email addresses",
        init="comment",
        example="you@example.com,5551234567@vtext.com",
    ),
    Setting(
        "DEVICE_NAMES",
        "coreid:Friendly name pairs, comma-separated",
        {},
        v.device_names,
        "coreid:Name pairs, comma-separated",
        field="device_names",
        init="comment",
        example="0123456789abcdef01234567:Storage unit 12",
    ),
    Setting(
        "ALERT_TIMEZONE",
        "IANA time zone for times in notifications",
        "UTC",
        v.timezone,
        "an IANA time zone such as Europe/Paris",
        field="alert_timezone",
        init="value",
    ),
    Setting(
        "ALERT_COOLDOWN_SECONDS",
        "repeats of an alert inside this window fold into one summary; 0 sends each",
        60.0,
        v.non_negative_float,
        "a number of seconds, 0 or more",
        field="alert_cooldown_seconds",
        init="value",
    ),
    Setting(
        "RETRY_BASE_SECONDS",
        "first retry delay; doubles each try, ±20% jitter, capped at 1 h",
        2.0,
        v.positive_float,
        "a positive number of seconds",
        field="retry_base_seconds",
    ),
    Setting(
        "RETRY_MAX_ATTEMPTS",
        "tries in all before a delivery becomes a dead letter",
        12,
        v.positive_int,
        "a positive whole number",
        field="retry_max_attempts",
    ),
    Setting("DATA_DIR", "where the SQLite store lives", Path("./data"), Path, field="data_dir", init="value"),
    Setting(
        "EVENT_RETENTION_DAYS",
        "days an event is kept, with its deliveries; 0 keeps them forever",
        30,
        v.non_negative_int,
        "a whole number of days (0 or more; 0 keeps events forever)",
        field="event_retention_days",
        init="value",
    ),
    Setting(
        "AUDIT_RETENTION_DAYS",
        "days an audit record is kept; 0 keeps them forever",
        30,
        v.non_negative_int,
        "a whole number of days (0 or more; 0 keeps audit records forever)",
        field="audit_retention_days",
        init="value",
    ),
    Setting(
        "DATABASE_URL",
        "the store in PostgreSQL instead of SQLite under DATA_DIR, shared by replicas on several hosts",
        parse=v.database_url,
        expects="a postgresql:// URL libpq can read (percent-encode @ : / % [ ] in the password)",
        secret=True,
        field="database_url",
    ),
    Setting(
        "REDIS_URL",
        "rate-limit counters and the live fan-out through Redis, shared by replicas",
        parse=v.redis_url,
        expects="a URL starting with redis://, rediss:// or unix://",
        secret=True,
        field="redis_url",
    ),
    Setting(
        "DISABLE_SYSTEM_INFO",
        "true: /health shows only status and timestamp, /metrics is hidden",
        False,
        v.boolean,
        "true or false",
        field="disable_system_info",
    ),
    Setting(
        "METRICS_TOKEN", "bearer token required for /metrics when set", secret=True, strong=True, field="metrics_token"
    ),
    Setting(
        "RATE_LIMIT",
        "per source and client address, flask-limiter syntax",
        "60/minute;20/second",
        v.rate_limit,
        "a rate limit such as 60/minute;20/second",
        field="rate_limit",
        init="value",
    ),
    Setting(
        "MAX_PAYLOAD_BYTES",
        "larger bodies get 413 before they are read",
        1048576,
        v.positive_int,
        "a positive whole number",
        field="max_payload_bytes",
    ),
    Setting(
        "TRUSTED_PROXIES",
        "reverse proxies in front; only then is X-Forwarded-For believed",
        0,
        v.non_negative_int,
        "a whole number (0 or more)",
        field="trusted_proxies",
    ),
    Setting(
        "SUBSCRIBER_TOKENS",
        "token:channel pairs for the live stream",
        {},
        v.subscriber_tokens,
        "token:channel pairs, comma-separated, each token at least 16 characters",
        secret=True,
        field="subscriber_tokens",
    ),
    Setting(
        "LOG_LEVEL",
        "DEBUG, INFO, WARNING or ERROR",
        "INFO",
        v.log_level,
        "DEBUG, INFO, WARNING or ERROR",
        field="log_level",
    ),
    Setting(
        "DELIVERY_LEASE_SECONDS",
        "how long a worker may hold a delivery before another takes it over",
        parse=v.positive_float,
        expects="a positive number of seconds",
    ),
    Setting(
        "WORKER_POLL_SECONDS",
        "how often an idle worker looks for work",
        0.2,
        v.positive_float,
        "a positive number of seconds",
        field="worker_poll_seconds",
    ),
    Setting("WEB_CONCURRENCY", "Gunicorn worker processes", 2, v.positive_int, "a positive whole number"),
    Setting(
        "GUNICORN_THREADS",
        "threads per Gunicorn worker process; each live stream holds one, 8 are kept for everything else",
        64,
        v.positive_int,
        "a positive whole number",
        field="web_threads",
    ),
)
BY_NAME = {setting.name: setting for setting in SETTINGS}

# Read by the deployment around the app (Compose, Prometheus' client), not by it.
DEPLOYMENT_NAMES = ("WEBHOOK_DOMAIN", "WEBHOOK_SERVER_IMAGE", "PROMETHEUS_MULTIPROC_DIR")
# In the public contract, but not built in this version: said at start rather than ignored.
NOT_YET_NAMES: tuple[str, ...] = ()
# A variable starting with one of these is meant for us: an unknown one is likely a typo.
OUR_PREFIXES = (
    *("PARTICLE_", "WEBHOOK_", "SMTP_", "RECIPIENT_", "DEVICE_", "ALERT_", "FLASK_", "REDIS_", "SOURCES_", "DATABASE_"),
    *("METRICS_", "RATE_LIMIT", "MAX_PAYLOAD", "TRUSTED_", "RETRY_", "SUBSCRIBER_", "DELIVERY_", "DISABLE_SYSTEM"),
    *("EVENT_RETENTION", "AUDIT_RETENTION"),
)


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
    event_retention_days: int  # 0: forever
    audit_retention_days: int  # 0: forever
    database_url: str | None
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
    web_threads: int
    targets: dict[str, Target] = field(default_factory=dict)  # SOURCES_FILE's [targets.NAME]
    extra: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # said at start; nothing here stops the server

    @property
    def database_path(self) -> Path:
        return self.data_dir / "webhooks.sqlite3"


def read_environment(overrides: Mapping[str, Any] | None = None, env_file: str = ".env") -> dict[str, str]:
    """`.env`, then the process environment (which wins), then explicit overrides."""
    merged: dict[str, str] = {}
    if env_file and Path(env_file).is_file():
        merged.update({k: val for k, val in dotenv_values(env_file).items() if val is not None})
    merged.update(os.environ)
    for key, value in (overrides or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    return merged


class Reader:
    """Reads values through the table, resolving NAME_FILE, and collects problems instead of stopping."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def raw(self, name: str) -> str | None:
        """The text of `name` or of the file `NAME_FILE` names (one trailing line break dropped)."""
        value, file_name = self.env.get(name), self.env.get(f"{name}_FILE")
        if value not in (None, "") and file_name not in (None, ""):
            self.problems.append(f"{name} and {name}_FILE are both set; use one")
            return None
        if not file_name:
            return value if value != "" else None
        try:
            text = Path(file_name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.problems.append(f"{name}_FILE cannot be read ({type(exc).__name__})")
            return None
        # As editors and `echo` leave it (LF, or CRLF from Windows).
        return text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text

    def secret(self, name: str) -> str | None:
        """A secret named by SOURCES_FILE: held to the 16-character rule."""
        value = self.raw(name)
        problem = secret_problem(name, value)
        if problem:
            self.problems.append(problem)
        return value

    def value(self, setting: Setting) -> Any:
        text = self.raw(setting.name)
        if text is None:
            return setting.default
        if setting.strong and (problem := secret_problem(setting.name, text)):
            self.problems.append(problem)
        if setting.parse is None:
            return text
        try:
            return setting.parse(text.strip())
        except (ValueError, TypeError):
            self.problems.append(f"{setting.name} must be {setting.expects}")
            return setting.default


def secret_problem(name: str, value: str | None) -> str | None:
    return None if value is None else v.secret_problem(name, value)


def load_settings(env: Mapping[str, str]) -> Settings:
    """Validate `env` (see `read_environment`) into `Settings`, or raise `ConfigError`."""
    reader = Reader(env)
    values = {setting.name: reader.value(setting) for setting in SETTINGS}
    sources, targets = _sources(values, reader)
    smtp = _smtp(values, reader.problems)
    recipients = _recipients(values, env, smtp is not None, reader.problems)
    if reader.problems:
        raise ConfigError(reader.problems)
    lease = values["DELIVERY_LEASE_SECONDS"]
    # A send may take several SMTP timeouts (connect, TLS, each command): the lease must outlast it.
    default_lease = max(60.0, 4 * smtp.timeout) if smtp else 60.0
    referenced = {name for source in sources.values() for name in source.secret_names}
    referenced |= {target.secret_name for target in targets.values()}
    return Settings(
        sources=sources,
        targets=targets,
        smtp=smtp,
        recipients=recipients,
        delivery_lease_seconds=lease if lease is not None else default_lease,
        warnings=unknown_name_warnings(env, referenced),
        **{s.field: values[s.name] for s in SETTINGS if s.field},
    )


def _sources(values: dict[str, Any], reader: Reader) -> tuple[dict[str, Source], dict[str, Target]]:
    """The built-in sources, and what SOURCES_FILE declares: more sources and the forwarding targets."""
    sources = builtin_sources(values["PARTICLE_WEBHOOK_SECRET"], values["WEBHOOK_SECRET"])
    targets: dict[str, Target] = {}
    if values["SOURCES_FILE"]:
        declared = load_sources_file(values["SOURCES_FILE"], reader.secret, reader.problems, sources)
        sources.update(declared.sources)
        targets = declared.targets
    if not sources and not reader.problems:
        reader.problems.append(
            "no source is enabled: set PARTICLE_WEBHOOK_SECRET, WEBHOOK_SECRET or SOURCES_FILE "
            "(`webhook-server init` writes a .env with fresh secrets)"
        )
    return sources, targets


def _recipients(values: dict[str, Any], env: Mapping[str, str], smtp: bool, problems: list[str]) -> tuple[str, ...]:
    recipients: tuple[str, ...] | None = values["RECIPIENT_EMAIL"]
    if smtp and recipients == ():  # set, but only commas and spaces
        problems.append("RECIPIENT_EMAIL must name at least one address when SMTP is configured")
    elif smtp and recipients is None and not (env.get("RECIPIENT_EMAIL") or env.get("RECIPIENT_EMAIL_FILE")):
        problems.append("RECIPIENT_EMAIL is required when SMTP is configured")
    return recipients or ()


def _smtp(values: dict[str, Any], problems: list[str]) -> SmtpSettings | None:
    """The SMTP block: on when SMTP_EMAIL or SMTP_HOST is set; defaults that depend on each other."""
    email, host, password = values["SMTP_EMAIL"], values["SMTP_HOST"], values["SMTP_PASSWORD"]
    security, ca_file = values["SMTP_SECURITY"], values["SMTP_CA_FILE"]
    if ca_file:
        _check_ca_file(ca_file, problems)
    if email is None and host is None:
        if password:
            problems.append("SMTP_PASSWORD is set but neither SMTP_EMAIL nor SMTP_HOST is")
        return None
    host = (host or "smtp.gmail.com").strip()
    if password and email is None:
        problems.append("SMTP_PASSWORD needs SMTP_EMAIL, which is the login")
    if password and security == "none" and not v.is_loopback(host):
        problems.append("SMTP_PASSWORD with SMTP_SECURITY=none would send the password in clear; use starttls or ssl")
    return SmtpSettings(
        host=host,
        port=values["SMTP_PORT"] or v.SECURITY_PORTS[security],
        security=security,
        username=email if password else None,
        password=password,
        sender=email or f"webhook-server@{socket.gethostname()}",
        ca_file=ca_file,
        timeout=values["SMTP_TIMEOUT"],
    )


def _check_ca_file(path: str, problems: list[str]) -> None:
    """The CA bundle must load, or the worker would fail at its first send."""
    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        problems.append("SMTP_CA_FILE does not name a readable file")
    except (OSError, ssl.SSLError, ValueError):
        problems.append("SMTP_CA_FILE is not a PEM CA bundle")


def unknown_name_warnings(env: Mapping[str, str], referenced: set[str]) -> tuple[str, ...]:
    """A warning for each variable that looks meant for us but is not read (a typo, mostly)."""
    known = set(BY_NAME) | set(DEPLOYMENT_NAMES) | referenced
    known |= {f"{name}_FILE" for name in known}
    warnings = []
    for name in sorted(env):
        if name in NOT_YET_NAMES and env[name]:
            warnings.append(f"{name} is not used by this version yet; it is ignored")
        elif name.startswith(OUR_PREFIXES) and name not in known:
            close = difflib.get_close_matches(name.removesuffix("_FILE"), list(BY_NAME), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            warnings.append(f"{name} is not a setting and is ignored{hint}")
    return tuple(warnings)


def settings_from_environment(overrides: Mapping[str, Any] | None = None) -> Settings:
    """The usual entry point: `.env` + environment + overrides, validated."""
    return load_settings(read_environment(overrides))


def setting_from_environment(name: str) -> Any:
    """One setting alone (Gunicorn's config reads its own three), or `ConfigError`."""
    reader = Reader(read_environment())
    value = reader.value(BY_NAME[name])
    if reader.problems:
        raise ConfigError(reader.problems)
    return value
