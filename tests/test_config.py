"""Configuration: every malformed value stops the start with a message naming the variable,
never echoing the value; secrets are long; NAME_FILE; SMTP defaults; `.env`."""

from __future__ import annotations

import base64
import socket
from pathlib import Path
from typing import Any

import pytest

from webhook_server.channels.sms import is_sms_gateway
from webhook_server.settings import (
    ConfigError,
    Settings,
    load_settings,
    read_environment,
    settings_from_environment,
)
from webhook_server.values import MIN_SECRET_LENGTH

# A distinctive valid secret: it must never show up in any message either.
PARTICLE = "Valid-Particle-S3cret-qwertyuiop"


def env(tmp_path: Path, **values: str | None) -> dict[str, str]:
    base: dict[str, str | None] = {"PARTICLE_WEBHOOK_SECRET": PARTICLE, "DATA_DIR": str(tmp_path / "data")}
    base.update(values)
    return {k: v for k, v in base.items() if v is not None}


def problems_of(values: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_settings(values)
    error = caught.value
    assert error.problems
    assert all(problem in str(error) for problem in error.problems)
    assert PARTICLE not in str(error)
    return error


def assert_names_without_echo(error: ConfigError, name: str, value: str) -> None:
    assert any(name in problem for problem in error.problems), error.problems
    assert value not in str(error)
    for problem in error.problems:
        assert value not in problem


# Every variable, with values that must be refused. Each value is distinctive, so finding it
# in a message would mean it was echoed.
MALFORMED = [
    ("PARTICLE_WEBHOOK_SECRET", "Sh0rt-S3CRET-a"),
    ("PARTICLE_WEBHOOK_SECRET", "bell-S3CRET-0123456789\x07"),
    ("PARTICLE_WEBHOOK_SECRET", "two-S3CRET-lines-0123\nsecond"),
    ("WEBHOOK_SECRET", "Sh0rt-S3CRET-b"),
    ("WEBHOOK_SECRET", "tab-S3CRET-0123456789\tx"),
    ("FLASK_SECRET_KEY", "Sh0rt-S3CRET-c"),
    ("METRICS_TOKEN", "Sh0rt-S3CRET-d"),
    ("METRICS_TOKEN", "del-S3CRET-0123456789\x7f"),
    ("SUBSCRIBER_TOKENS", "Sh0rt-S3CRET-e:particle"),
    ("SUBSCRIBER_TOKENS", "no-channel-S3CRET-0123456789"),
    ("SUBSCRIBER_TOKENS", "empty-channel-S3CRET-0123:"),
    ("SUBSCRIBER_TOKENS", "good-token-S3CRET-01234:particle,Sh0rt-S3CRET-f:*"),
    ("SMTP_EMAIL", "not-an-email-S3CRET"),
    ("SMTP_EMAIL", "S3CRET@nodot"),
    ("SMTP_EMAIL", "S3CRET <me@example.com>"),
    ("SMTP_HOST", "smtp host S3CRET"),
    ("SMTP_HOST", "smtp://S3CRET.example.com"),
    ("SMTP_PORT", "port-S3CRET"),
    ("SMTP_PORT", "9876543"),
    ("SMTP_PORT", "-31337"),
    ("SMTP_SECURITY", "tls-S3CRET"),
    ("SMTP_TIMEOUT", "-31337.5"),
    ("SMTP_TIMEOUT", "slow-S3CRET"),
    ("SMTP_CA_FILE", "/nonexistent/S3CRET-ca.pem"),
    ("RECIPIENT_EMAIL", "ok@example.com,bad-S3CRET"),
    ("RECIPIENT_EMAIL", "S3CRET@nodot"),
    ("DEVICE_NAMES", "no-colon-S3CRET"),
    ("DEVICE_NAMES", ":Name-S3CRET"),
    ("DEVICE_NAMES", "0123456789abcdef01234567:"),
    ("ALERT_TIMEZONE", "Mars/S3CRET"),
    ("ALERT_TIMEZONE", "America"),
    ("ALERT_TIMEZONE", "S3CRET" * 60),
    ("ALERT_TIMEZONE", "../../etc/S3CRET"),
    ("REDIS_URL", "http://user:S3CRET-pw@redis:6379/0"),
    ("REDIS_URL", "S3CRET-host:6379"),
    ("DISABLE_SYSTEM_INFO", "maybe-S3CRET"),
    ("RATE_LIMIT", "lots-S3CRET"),
    ("RATE_LIMIT", "10/fortnight"),
    ("RATE_LIMIT", "-5/minute"),
    ("MAX_PAYLOAD_BYTES", "1MB-S3CRET"),
    ("MAX_PAYLOAD_BYTES", "-424242"),
    ("MAX_PAYLOAD_BYTES", "1048576.5"),
    ("TRUSTED_PROXIES", "-31337"),
    ("TRUSTED_PROXIES", "one-S3CRET"),
    ("ALERT_COOLDOWN_SECONDS", "-31337"),
    ("ALERT_COOLDOWN_SECONDS", "nan"),
    ("ALERT_COOLDOWN_SECONDS", "inf"),
    ("ALERT_COOLDOWN_SECONDS", "minute-S3CRET"),
    ("RETRY_BASE_SECONDS", "-31337"),
    ("RETRY_BASE_SECONDS", "fast-S3CRET"),
    ("RETRY_MAX_ATTEMPTS", "-31337"),
    ("RETRY_MAX_ATTEMPTS", "12.75"),
    ("DELIVERY_LEASE_SECONDS", "-31337"),
    ("WORKER_POLL_SECONDS", "-31337"),
    ("LOG_LEVEL", "LOUD-S3CRET"),
    ("SOURCES_FILE", "/nonexistent/S3CRET.toml"),
    ("PARTICLE_WEBHOOK_SECRET_FILE", "/nonexistent/S3CRET-file"),
    ("SMTP_PASSWORD_FILE", "/nonexistent/S3CRET-password"),
]

# Refused too, but too short to check for an echo.
MALFORMED_SHORT = [
    ("SMTP_PORT", "0"),
    ("MAX_PAYLOAD_BYTES", "0"),
    ("RETRY_BASE_SECONDS", "0"),
    ("RETRY_MAX_ATTEMPTS", "0"),
    ("DELIVERY_LEASE_SECONDS", "0"),
    ("WORKER_POLL_SECONDS", "0"),
    ("SMTP_TIMEOUT", "0"),
    ("DISABLE_SYSTEM_INFO", "2"),
]

# Settings that only count alongside others (SMTP needs recipients to be complete).
CONTEXT = {
    "SMTP_EMAIL": {"RECIPIENT_EMAIL": "ops@example.com"},
    "SMTP_HOST": {"RECIPIENT_EMAIL": "ops@example.com"},
    "SMTP_PORT": {"SMTP_HOST": "mail.example.com", "RECIPIENT_EMAIL": "ops@example.com"},
    "SMTP_SECURITY": {"SMTP_HOST": "mail.example.com", "RECIPIENT_EMAIL": "ops@example.com"},
    "SMTP_TIMEOUT": {"SMTP_HOST": "mail.example.com", "RECIPIENT_EMAIL": "ops@example.com"},
    "SMTP_CA_FILE": {"SMTP_HOST": "mail.example.com", "RECIPIENT_EMAIL": "ops@example.com"},
    "RECIPIENT_EMAIL": {"SMTP_HOST": "mail.example.com"},
    "SMTP_PASSWORD_FILE": {"SMTP_HOST": "mail.example.com", "RECIPIENT_EMAIL": "ops@example.com"},
}


@pytest.mark.parametrize("case", MALFORMED, ids=[f"{n}={i}" for i, (n, _) in enumerate(MALFORMED)])
def test_malformed_value_names_the_variable_and_never_echoes_it(tmp_path: Path, case: tuple[str, str]) -> None:
    name, value = case
    values = env(tmp_path, **CONTEXT.get(name, {}), **{name: value})
    error = problems_of(values)
    assert_names_without_echo(error, name, value)


@pytest.mark.parametrize("case", MALFORMED_SHORT, ids=[f"{n}={v}" for n, v in MALFORMED_SHORT])
def test_malformed_short_value_names_the_variable(tmp_path: Path, case: tuple[str, str]) -> None:
    name, value = case
    error = problems_of(env(tmp_path, **CONTEXT.get(name, {}), **{name: value}))
    assert any(name in problem for problem in error.problems), error.problems


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    values = env(
        tmp_path,
        **{name: value for name, value in MALFORMED if "_FILE" not in name and name != "PARTICLE_WEBHOOK_SECRET"},
    )
    error = problems_of(values)
    for _, value in MALFORMED:
        assert value not in str(error)
    for name in ("WEBHOOK_SECRET", "RATE_LIMIT", "MAX_PAYLOAD_BYTES", "ALERT_TIMEZONE", "LOG_LEVEL", "REDIS_URL"):
        assert any(name in problem for problem in error.problems), name


def test_valid_values_are_taken(tmp_path: Path) -> None:
    settings = load_settings(
        env(
            tmp_path,
            WEBHOOK_SECRET="It's a Secret to Everybody",
            FLASK_SECRET_KEY="flask-secret-key-0123456789",
            METRICS_TOKEN="metrics-token-0123456789",
            SUBSCRIBER_TOKENS=(
                "laptop-token-0123456789:particle, laptop-token-0123456789:generic,ops-token-0123456789:*"
            ),
            DEVICE_NAMES="0123456789ABCDEF01234567:Storage unit 12, api:Cloud",
            ALERT_TIMEZONE="America/New_York",
            REDIS_URL="redis://localhost:6379/0",
            DISABLE_SYSTEM_INFO="TRUE",
            RATE_LIMIT="10/minute;2/second",
            MAX_PAYLOAD_BYTES=" 2048 ",
            TRUSTED_PROXIES="2",
            ALERT_COOLDOWN_SECONDS="0",
            RETRY_BASE_SECONDS="0.5",
            RETRY_MAX_ATTEMPTS="3",
            LOG_LEVEL="debug",
        )
    )
    assert isinstance(settings, Settings)
    assert sorted(settings.sources) == ["generic", "particle"]
    assert settings.subscriber_tokens == {
        "laptop-token-0123456789": frozenset({"particle", "generic"}),
        "ops-token-0123456789": frozenset({"*"}),
    }
    assert settings.device_names == {"0123456789abcdef01234567": "Storage unit 12", "api": "Cloud"}
    assert settings.alert_timezone == "America/New_York"
    assert settings.disable_system_info is True
    assert settings.max_payload_bytes == 2048
    assert settings.trusted_proxies == 2
    assert settings.alert_cooldown_seconds == 0
    assert settings.retry_base_seconds == 0.5
    assert settings.retry_max_attempts == 3
    assert settings.log_level == "DEBUG"
    assert settings.smtp is None


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings({"PARTICLE_WEBHOOK_SECRET": PARTICLE})
    assert settings.rate_limit == "60/minute;20/second"
    assert settings.max_payload_bytes == 1048576
    assert settings.alert_timezone == "UTC"
    assert settings.alert_cooldown_seconds == 60
    assert settings.retry_base_seconds == 2
    assert settings.retry_max_attempts == 12
    assert settings.trusted_proxies == 0
    assert settings.disable_system_info is False
    assert settings.data_dir == Path("./data")
    assert settings.smtp is None and settings.recipients == ()
    assert list(settings.sources) == ["particle"]


# --------------------------------------------------------------------------- secret length


def _short_secret_cases() -> list[Any]:
    return [
        pytest.param({"PARTICLE_WEBHOOK_SECRET": "{s}"}, "PARTICLE_WEBHOOK_SECRET", id="particle"),
        pytest.param({"WEBHOOK_SECRET": "{s}"}, "WEBHOOK_SECRET", id="webhook"),
        pytest.param({"FLASK_SECRET_KEY": "{s}"}, "FLASK_SECRET_KEY", id="flask"),
        pytest.param({"METRICS_TOKEN": "{s}"}, "METRICS_TOKEN", id="metrics"),
        pytest.param({"SUBSCRIBER_TOKENS": "{s}:particle"}, "SUBSCRIBER_TOKENS", id="subscriber"),
    ]


@pytest.mark.parametrize(("values", "name"), _short_secret_cases())
def test_secret_of_15_characters_is_refused_and_16_accepted(tmp_path: Path, values: dict[str, str], name: str) -> None:
    short = "Q" * (MIN_SECRET_LENGTH - 1)
    error = problems_of(env(tmp_path, **{k: v.format(s=short) for k, v in values.items()}))
    assert_names_without_echo(error, name, short)
    long_enough = "Q" * MIN_SECRET_LENGTH
    load_settings(env(tmp_path, **{k: v.format(s=long_enough) for k, v in values.items()}))


def test_source_secret_of_15_characters_is_refused(tmp_path: Path) -> None:
    path = write_sources(tmp_path, '[sources.hook]\nscheme = "bearer"\nsecrets = ["HOOK_SECRET"]\n')
    short = "W" * (MIN_SECRET_LENGTH - 1)
    error = problems_of(env(tmp_path, SOURCES_FILE=path, HOOK_SECRET=short))
    assert_names_without_echo(error, "HOOK_SECRET", short)
    load_settings(env(tmp_path, SOURCES_FILE=path, HOOK_SECRET=short + "W"))


def test_smtp_password_may_be_short(tmp_path: Path) -> None:
    settings = load_settings(
        env(tmp_path, SMTP_EMAIL="me@example.com", SMTP_PASSWORD="abc", RECIPIENT_EMAIL="ops@example.com")
    )
    assert settings.smtp is not None and settings.smtp.password == "abc"


def test_secrets_may_contain_inner_spaces(tmp_path: Path) -> None:
    settings = load_settings(env(tmp_path, WEBHOOK_SECRET="It's a Secret to Everybody"))
    assert settings.sources["generic"].secrets == ("It's a Secret to Everybody",)


# --------------------------------------------------------------------------- NAME_FILE

SECRET_VARIABLES = ["PARTICLE_WEBHOOK_SECRET", "WEBHOOK_SECRET", "FLASK_SECRET_KEY", "METRICS_TOKEN", "SMTP_PASSWORD"]


def _smtp_context(name: str) -> dict[str, str]:
    return {"SMTP_EMAIL": "ops@example.com", "RECIPIENT_EMAIL": "ops@example.com"} if name == "SMTP_PASSWORD" else {}


def _secret_value(settings: Settings, name: str) -> str | None:
    return {
        "PARTICLE_WEBHOOK_SECRET": lambda: settings.sources["particle"].secrets[0],
        "WEBHOOK_SECRET": lambda: settings.sources["generic"].secrets[0],
        "FLASK_SECRET_KEY": lambda: settings.flask_secret_key,
        "METRICS_TOKEN": lambda: settings.metrics_token,
        "SMTP_PASSWORD": lambda: settings.smtp.password if settings.smtp else None,
    }[name]()


@pytest.mark.parametrize("name", SECRET_VARIABLES)
def test_name_and_name_file_both_set_is_an_error(tmp_path: Path, name: str) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("File-S3cret-0123456789\n", encoding="utf-8")
    values = env(
        tmp_path, **_smtp_context(name), **{name: "Direct-S3cret-0123456789", f"{name}_FILE": str(secret_file)}
    )
    error = problems_of(values)
    assert any(name in p and f"{name}_FILE" in p for p in error.problems), error.problems
    assert "Direct-S3cret" not in str(error) and "File-S3cret" not in str(error)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param("File-S3cret-0123456789\n", "File-S3cret-0123456789", id="one-newline"),
        pytest.param("File-S3cret-0123456789", "File-S3cret-0123456789", id="no-newline"),
        pytest.param("File-S3cret-0123456789\r\n", "File-S3cret-0123456789", id="crlf"),
        pytest.param(" File-S3cret-0123456789\n", " File-S3cret-0123456789", id="spaces-kept"),
    ],
)
@pytest.mark.parametrize("name", SECRET_VARIABLES)
def test_name_file_is_read_with_one_trailing_newline_stripped(
    tmp_path: Path, name: str, content: str, expected: str
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(content.encode())
    values = env(tmp_path, **_smtp_context(name), **{f"{name}_FILE": str(secret_file)})
    if name == "PARTICLE_WEBHOOK_SECRET":
        del values["PARTICLE_WEBHOOK_SECRET"]
    assert _secret_value(load_settings(values), name) == expected


@pytest.mark.parametrize("name", ["PARTICLE_WEBHOOK_SECRET", "WEBHOOK_SECRET", "FLASK_SECRET_KEY", "METRICS_TOKEN"])
def test_name_file_with_two_newlines_keeps_one_and_is_refused(tmp_path: Path, name: str) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("File-S3cret-0123456789\n\n", encoding="utf-8")
    values = env(tmp_path, **{f"{name}_FILE": str(secret_file)})
    if name == "PARTICLE_WEBHOOK_SECRET":
        del values["PARTICLE_WEBHOOK_SECRET"]
    error = problems_of(values)
    assert_names_without_echo(error, name, "File-S3cret")


def test_name_file_that_is_a_directory_or_not_utf8(tmp_path: Path) -> None:
    error = problems_of(env(tmp_path, WEBHOOK_SECRET_FILE=str(tmp_path)))
    assert any("WEBHOOK_SECRET_FILE" in p for p in error.problems)
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe" * 20)
    error = problems_of(env(tmp_path, WEBHOOK_SECRET_FILE=str(binary)))
    assert any("WEBHOOK_SECRET_FILE" in p for p in error.problems)


def test_short_secret_from_a_file_is_refused(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("Sh0rt-F1le-S3c\n", encoding="utf-8")
    error = problems_of(env(tmp_path, WEBHOOK_SECRET_FILE=str(secret_file)))
    assert_names_without_echo(error, "WEBHOOK_SECRET", "Sh0rt-F1le-S3c")


# --------------------------------------------------------------------------- sources


def test_no_source_at_all_is_an_error(tmp_path: Path) -> None:
    error = problems_of({"DATA_DIR": str(tmp_path)})
    assert any("PARTICLE_WEBHOOK_SECRET" in p and "WEBHOOK_SECRET" in p for p in error.problems)


def test_empty_secret_turns_the_source_off(tmp_path: Path) -> None:
    assert "generic" not in load_settings(env(tmp_path, WEBHOOK_SECRET="")).sources
    error = problems_of(env(tmp_path, WEBHOOK_SECRET="   "))
    assert any("WEBHOOK_SECRET" in p for p in error.problems)


def test_builtin_source_is_on_only_with_its_secret(tmp_path: Path) -> None:
    assert list(load_settings(env(tmp_path)).sources) == ["particle"]
    only_generic = env(tmp_path, PARTICLE_WEBHOOK_SECRET=None, WEBHOOK_SECRET="generic-secret-0123456789")
    assert list(load_settings(only_generic).sources) == ["generic"]


def write_sources(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sources.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_sources_file_alone_is_enough(tmp_path: Path) -> None:
    path = write_sources(tmp_path, '[sources.hook]\nscheme = "bearer"\nsecrets = ["HOOK_SECRET"]\n')
    settings = load_settings({"SOURCES_FILE": path, "HOOK_SECRET": "hook-secret-0123456789"})
    assert list(settings.sources) == ["hook"]


def test_sources_file_full_entry(tmp_path: Path) -> None:
    (tmp_path / "schema.json").write_text('{"type": "object"}', encoding="utf-8")
    path = write_sources(
        tmp_path,
        """
[sources.alarm]
scheme = "hmac-sha512"
secrets = ["ALARM_NEW", "ALARM_OLD"]
schema = "schema.json"
allow = ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]
rate_limit = "5/minute"
max_payload_bytes = 4096
recipients = ["ops@example.com"]
notify = false
signature_header = "X-Alarm-Signature"
""",
    )
    settings = load_settings(
        env(tmp_path, SOURCES_FILE=path, ALARM_NEW="alarm-new-0123456789", ALARM_OLD="alarm-old-0123456789")
    )
    source = settings.sources["alarm"]
    assert source.secrets == ("alarm-new-0123456789", "alarm-old-0123456789")
    assert source.validator is not None
    assert source.allows("10.2.3.4") and source.allows("192.0.2.7") and source.allows("2001:db8::1")
    assert not source.allows("192.0.2.8") and not source.allows("not-an-address")
    assert source.rate_limit == "5/minute" and source.max_payload_bytes == 4096
    assert source.recipients == ("ops@example.com",) and source.notify is False
    assert source.signature_header == "X-Alarm-Signature"


HOOK = '[sources.hook]\nscheme = "bearer"\nsecrets = ["HOOK_SECRET"]\n'

BAD_SOURCES = [
    pytest.param("this is not = = toml", id="not-toml"),
    pytest.param("", id="empty"),
    pytest.param("[other]\nx = 1\n", id="no-sources-table"),
    pytest.param('[sources.hook]\nscheme = "md5"\nsecrets = ["HOOK_SECRET"]\n', id="unknown-scheme"),
    pytest.param('[sources.hook]\nsecrets = ["HOOK_SECRET"]\n', id="no-scheme"),
    pytest.param('[sources.hook]\nscheme = "bearer"\n', id="no-secrets"),
    pytest.param('[sources.hook]\nscheme = "bearer"\nsecrets = []\n', id="empty-secrets"),
    pytest.param('[sources.hook]\nscheme = "bearer"\nsecrets = ["UNSET_VARIABLE"]\n', id="secret-unset"),
    pytest.param('[sources.hook]\nscheme = "bearer"\nsecrets = [42]\n', id="secret-not-a-name"),
    pytest.param('[sources.particle]\nscheme = "bearer"\nsecrets = ["HOOK_SECRET"]\n', id="reserved-particle"),
    pytest.param('[sources.generic]\nscheme = "bearer"\nsecrets = ["HOOK_SECRET"]\n', id="reserved-generic"),
    pytest.param('[sources."Bad Name"]\nscheme = "bearer"\nsecrets = ["HOOK_SECRET"]\n', id="bad-name"),
    pytest.param('[sources."../x"]\nscheme = "bearer"\nsecrets = ["HOOK_SECRET"]\n', id="path-name"),
    pytest.param("[sources]\nhook = 1\n", id="not-a-table"),
    pytest.param(HOOK + 'allow = ["10.0.0.0/33"]\n', id="bad-cidr"),
    pytest.param(HOOK + 'allow = "10.0.0.0/8"\n', id="allow-not-a-list"),
    pytest.param(HOOK + 'rate_limit = "lots"\n', id="bad-rate-limit"),
    pytest.param(HOOK + "rate_limit = 5\n", id="rate-limit-number"),
    pytest.param(HOOK + "max_payload_bytes = 0\n", id="max-payload-zero"),
    pytest.param(HOOK + 'max_payload_bytes = "1MB"\n', id="max-payload-text"),
    pytest.param(HOOK + "max_payload_bytes = true\n", id="max-payload-bool"),
    pytest.param(HOOK + 'schema = "missing.json"\n', id="schema-missing"),
    pytest.param(HOOK + 'schema = "bad-schema.json"\n', id="schema-invalid"),
    pytest.param(HOOK + 'schema = "not-json.json"\n', id="schema-not-json"),
    pytest.param(HOOK + "schema = 1\n", id="schema-not-a-path"),
    pytest.param(HOOK + 'recipients = ["not-an-address"]\n', id="bad-recipient"),
    pytest.param(HOOK + 'notify = "yes"\n', id="notify-not-bool"),
    pytest.param(HOOK + 'signature_header = "X Bad: header"\n', id="bad-signature-header"),
    pytest.param(HOOK + "colour = 1\n", id="unknown-key"),
    pytest.param(
        '[sources.hook]\nscheme = "standard-webhooks"\nsecrets = ["HOOK_SECRET"]\n', id="standard-webhooks-not-base64"
    ),
]


@pytest.mark.parametrize("text", BAD_SOURCES)
def test_bad_sources_file_is_an_error_naming_it(tmp_path: Path, text: str) -> None:
    (tmp_path / "bad-schema.json").write_text('{"type": "nonsense"}', encoding="utf-8")
    (tmp_path / "not-json.json").write_text("{", encoding="utf-8")
    secret = "Hook-S3cret-value!-0123456789"
    path = write_sources(tmp_path, text)
    error = problems_of(env(tmp_path, SOURCES_FILE=path, HOOK_SECRET=secret))
    assert any("SOURCES_FILE" in p for p in error.problems), error.problems
    assert secret not in str(error)


def test_standard_webhooks_secret_must_be_whsec_base64(tmp_path: Path) -> None:
    path = write_sources(tmp_path, '[sources.sw]\nscheme = "standard-webhooks"\nsecrets = ["SW_SECRET"]\n')
    good = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    load_settings(env(tmp_path, SOURCES_FILE=path, SW_SECRET=good))
    load_settings(env(tmp_path, SOURCES_FILE=path, SW_SECRET=good.removeprefix("whsec_")))
    error = problems_of(env(tmp_path, SOURCES_FILE=path, SW_SECRET="whsec_not base64 at all!!"))
    assert_names_without_echo(error, "SW_SECRET", "not base64 at all")


# --------------------------------------------------------------------------- SMTP


@pytest.mark.parametrize(
    ("security", "port"), [(None, 587), ("starttls", 587), ("ssl", 465), ("none", 25), ("SSL", 465)]
)
def test_smtp_port_defaults_to_match_security(tmp_path: Path, security: str | None, port: int) -> None:
    settings = load_settings(
        env(tmp_path, SMTP_EMAIL="me@example.com", SMTP_SECURITY=security, RECIPIENT_EMAIL="ops@example.com")
    )
    assert settings.smtp is not None
    assert settings.smtp.port == port
    assert settings.smtp.security == (security or "starttls").lower()


def test_smtp_explicit_port_wins(tmp_path: Path) -> None:
    values = env(
        tmp_path, SMTP_HOST="mail.example.com", SMTP_SECURITY="ssl", SMTP_PORT="2465", RECIPIENT_EMAIL="ops@example.com"
    )
    settings = load_settings(values)
    assert settings.smtp is not None and settings.smtp.port == 2465


def test_smtp_email_alone_means_gmail(tmp_path: Path) -> None:
    settings = load_settings(
        env(tmp_path, SMTP_EMAIL="me@gmail.com", SMTP_PASSWORD="app password", RECIPIENT_EMAIL="ops@example.com")
    )
    smtp = settings.smtp
    assert smtp is not None
    assert (smtp.host, smtp.port, smtp.security) == ("smtp.gmail.com", 587, "starttls")
    assert smtp.sender == "me@gmail.com"
    assert (smtp.username, smtp.password) == ("me@gmail.com", "app password")


def test_smtp_host_alone_sends_from_the_host_name_without_login(tmp_path: Path) -> None:
    settings = load_settings(env(tmp_path, SMTP_HOST="localhost", RECIPIENT_EMAIL="ops@example.com"))
    smtp = settings.smtp
    assert smtp is not None
    assert smtp.host == "localhost"
    assert smtp.sender == f"webhook-server@{socket.gethostname()}"
    assert smtp.username is None and smtp.password is None


def test_smtp_email_without_password_does_not_log_in(tmp_path: Path) -> None:
    settings = load_settings(
        env(tmp_path, SMTP_EMAIL="me@example.com", SMTP_HOST="relay.example.com", RECIPIENT_EMAIL="ops@example.com")
    )
    assert settings.smtp is not None
    assert settings.smtp.username is None and settings.smtp.sender == "me@example.com"


@pytest.mark.parametrize("smtp", [{"SMTP_EMAIL": "me@example.com"}, {"SMTP_HOST": "mail.example.com"}])
def test_smtp_without_recipients_is_an_error(tmp_path: Path, smtp: dict[str, str]) -> None:
    error = problems_of(env(tmp_path, **smtp))
    assert any("RECIPIENT_EMAIL" in p for p in error.problems)


def test_smtp_password_without_smtp_is_an_error(tmp_path: Path) -> None:
    error = problems_of(env(tmp_path, SMTP_PASSWORD="Pa55-S3CRET-word"))
    assert_names_without_echo(error, "SMTP_PASSWORD", "Pa55-S3CRET-word")


def test_no_smtp_means_log_notifications(tmp_path: Path) -> None:
    settings = load_settings(env(tmp_path, RECIPIENT_EMAIL="ops@example.com"))
    assert settings.smtp is None


def test_recipients_and_sms_gateways(tmp_path: Path) -> None:
    settings = load_settings(
        env(
            tmp_path,
            SMTP_HOST="localhost",
            RECIPIENT_EMAIL=" ops@example.com , 5551234567@vtext.com,,5550000000@TXT.ATT.NET ",
        )
    )
    assert settings.recipients == ("ops@example.com", "5551234567@vtext.com", "5550000000@TXT.ATT.NET")
    assert [is_sms_gateway(r) for r in settings.recipients] == [False, True, True]


def test_smtp_ca_file_must_exist(tmp_path: Path) -> None:
    from tests.smtpsink import make_self_signed_cert

    ca, _ = make_self_signed_cert(tmp_path)
    settings = load_settings(
        env(tmp_path, SMTP_HOST="localhost", RECIPIENT_EMAIL="ops@example.com", SMTP_CA_FILE=str(ca))
    )
    assert settings.smtp is not None and settings.smtp.ca_file == str(ca)


# --------------------------------------------------------------------------- .env and the environment


def test_dotenv_is_read_and_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text(
        "PARTICLE_WEBHOOK_SECRET=from-dotenv-0123456789\nRATE_LIMIT=5/minute\nALERT_TIMEZONE=Europe/Paris\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RATE_LIMIT", "7/minute")
    merged = read_environment()
    assert merged["PARTICLE_WEBHOOK_SECRET"] == "from-dotenv-0123456789"
    assert merged["RATE_LIMIT"] == "7/minute"
    settings = settings_from_environment({"ALERT_TIMEZONE": "Asia/Tokyo"})
    assert settings.sources["particle"].secrets == ("from-dotenv-0123456789",)
    assert settings.rate_limit == "7/minute"
    assert settings.alert_timezone == "Asia/Tokyo"


def test_override_of_none_removes_a_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", "generic-secret-0123456789")
    merged = read_environment({"WEBHOOK_SECRET": None, "MAX_PAYLOAD_BYTES": 10})
    assert "WEBHOOK_SECRET" not in merged
    assert merged["MAX_PAYLOAD_BYTES"] == "10"


def test_dotenv_of_another_name_and_a_missing_one(tmp_path: Path) -> None:
    other = tmp_path / "other.env"
    other.write_text('WEBHOOK_SECRET="quoted secret 0123456789"\n', encoding="utf-8")
    assert read_environment(env_file=str(other))["WEBHOOK_SECRET"] == "quoted secret 0123456789"
    assert "WEBHOOK_SECRET" not in read_environment(env_file=str(tmp_path / "missing.env"))


def test_bad_value_in_dotenv_is_reported_like_any_other(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("PARTICLE_WEBHOOK_SECRET=Sh0rt-D0tenv\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        settings_from_environment()
    assert_names_without_echo(caught.value, "PARTICLE_WEBHOOK_SECRET", "Sh0rt-D0tenv")


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"SMTP_HOST": "mail.example.com", "SMTP_PASSWORD": "pw"}, "SMTP_PASSWORD needs SMTP_EMAIL"),
        ({"SMTP_EMAIL": "a@example.com", "SMTP_SECURITY": "none", "SMTP_PASSWORD": "pw"}, "in clear"),
        ({"SMTP_EMAIL": "a@example.com", "SMTP_CA_FILE": "/nonexistent/ca.pem"}, "SMTP_CA_FILE does not name"),
    ],
)
def test_smtp_combinations_that_cannot_work_are_refused(tmp_path: Path, extra: dict[str, str], problem: str) -> None:
    values = env(tmp_path, RECIPIENT_EMAIL="ops@example.com", **extra)
    with pytest.raises(ConfigError) as caught:
        load_settings(values)
    assert any(problem in p for p in caught.value.problems)


def test_a_ca_file_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate")
    values = env(tmp_path, SMTP_EMAIL="a@example.com", RECIPIENT_EMAIL="ops@example.com", SMTP_CA_FILE=str(bogus))
    with pytest.raises(ConfigError) as caught:
        load_settings(values)
    assert any("not a PEM CA bundle" in p for p in caught.value.problems)


def test_plain_smtp_with_a_password_is_allowed_on_loopback(tmp_path: Path) -> None:
    values = env(
        tmp_path,
        SMTP_EMAIL="a@example.com",
        SMTP_HOST="127.0.0.1",
        SMTP_SECURITY="none",
        SMTP_PASSWORD="pw",
        RECIPIENT_EMAIL="ops@example.com",
    )
    smtp = load_settings(values).smtp
    assert smtp is not None and smtp.username == "a@example.com"


# --------------------------------------------------------------------------- what a new user gets wrong


def test_a_negative_cooldown_says_zero_or_more(tmp_path: Path) -> None:
    error = problems_of(env(tmp_path, ALERT_COOLDOWN_SECONDS="-1"))
    assert error.problems == ["ALERT_COOLDOWN_SECONDS must be a number of seconds, 0 or more"]


def test_a_malformed_recipient_is_reported_once_not_also_as_missing(tmp_path: Path) -> None:
    error = problems_of(env(tmp_path, SMTP_HOST="mail.example.com", RECIPIENT_EMAIL="not-an-address"))
    assert error.problems == ["RECIPIENT_EMAIL must be comma-separated email addresses"]
    missing = problems_of(env(tmp_path, SMTP_HOST="mail.example.com"))
    assert missing.problems == ["RECIPIENT_EMAIL is required when SMTP is configured"]
    blank = problems_of(env(tmp_path, SMTP_HOST="mail.example.com", RECIPIENT_EMAIL=" , "))
    assert blank.problems == ["RECIPIENT_EMAIL must name at least one address when SMTP is configured"]


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("SMTP_EMIAL", "did you mean SMTP_EMAIL?"),
        ("RECIPIENT_EMAILS", "did you mean RECIPIENT_EMAIL?"),
        ("ALERT_COOLDOWN", "did you mean ALERT_COOLDOWN_SECONDS?"),
        ("PARTICLE_WEBHOOK_SECRT_FILE", "did you mean PARTICLE_WEBHOOK_SECRET?"),
        ("SMTP_XYZZY_QUUX", "SMTP_XYZZY_QUUX is not a setting and is ignored"),
    ],
)
def test_a_misspelled_setting_is_warned_about_with_the_closest_name(tmp_path: Path, name: str, hint: str) -> None:
    settings = load_settings(env(tmp_path, **{name: "some-value-S3CRET"}))
    (warning,) = settings.warnings
    assert warning.startswith(f"{name} is not a setting") and hint in warning
    assert "S3CRET" not in warning


def test_known_and_foreign_variables_are_not_warned_about(tmp_path: Path) -> None:
    sources = tmp_path / "sources.toml"
    sources.write_text('[sources.gh]\nscheme = "hmac-sha256"\nsecrets = ["WEBHOOK_GH_SECRET"]\n', encoding="utf-8")
    values = env(
        tmp_path,
        SOURCES_FILE=str(sources),
        WEBHOOK_GH_SECRET="a-long-enough-secret-0123",  # named by SOURCES_FILE: ours, though prefixed
        WEBHOOK_DOMAIN="hooks.example.com",
        WEB_CONCURRENCY="2",
        SMTP_TIMEOUT="5",
        HOME="/root",
        PATH="/usr/bin",
        LOGNAME="someone",
    )
    assert load_settings(values).warnings == ()


def test_database_url_takes_postgresql_urls_only_and_never_shows_one(tmp_path: Path) -> None:
    settings = load_settings(env(tmp_path, DATABASE_URL="postgresql://app:pw-123@db:5432/x"))
    assert settings.database_url == "postgresql://app:pw-123@db:5432/x" and settings.warnings == ()
    assert load_settings(env(tmp_path, DATABASE_URL="postgres://db/x")).database_url == "postgres://db/x"
    with pytest.raises(ConfigError) as refused:
        load_settings(env(tmp_path, DATABASE_URL="mysql://app:pw-123@db/x"))
    assert "DATABASE_URL" in str(refused.value) and "pw-123" not in str(refused.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[source.github]\nscheme = "bearer"\n', "unknown tables source"),
        ('[sources.a]\nscheme = "bearer"\nsecrets = ["A_SECRET"]\n[sorces.b]\nscheme = "bearer"\n', "sorces"),
        ('[target.billing]\nurl = "https://x"\n', "unknown tables target"),
        ('[targets.billing]\nurl = "https://x"\n', "[targets.billing]: sources, secret are required"),
    ],
)
def test_unknown_top_level_tables_in_sources_file_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "sources.toml"
    path.write_text(text, encoding="utf-8")
    error = problems_of(env(tmp_path, SOURCES_FILE=str(path), A_SECRET="a-long-enough-secret-0123"))
    assert any(expected in problem for problem in error.problems), error.problems
