"""Forwarding targets in SOURCES_FILE: every bad value stops the start with a message naming the
file, the `[targets.NAME]` table and the key, never the URL (it may carry a token) nor a secret;
good tables become `Target`s, which `check-config` and `sources --json` show."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from webhook_server.cli import main
from webhook_server.ingest.targets import Target
from webhook_server.settings import ConfigError, Settings, load_settings

PARTICLE = "Valid-Particle-S3cret-qwertyuiop"
HOOK = "Hook-S3cret-value!-0123456789"
GENERIC = "Generic-S3cret-value-0123456789"
# Distinctive: finding either in a message would mean it was echoed.
SIGNING = "whsec_" + base64.b64encode(b"signing-S3CRET-key-0123456789ab").decode()
TOKEN = "TOKEN-S3CRET-qwerty"
URL = f"https://billing.example.com/hooks/private-path?token={TOKEN}"

SOURCE = '[sources.hook]\nscheme = "bearer"\nsecrets = ["HOOK_SECRET"]\n'
URL_LINE = f'url = "{URL}"\n'
SOURCES_LINE = 'sources = ["hook"]\n'
SECRET_LINE = 'secret = "BILLING_SECRET"\n'
TARGET = "[targets.billing]\n" + URL_LINE + SOURCES_LINE + SECRET_LINE


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_pem(key: rsa.RSAPrivateKey, form: str) -> bytes:
    formats = {
        "pkcs8": serialization.PrivateFormat.PKCS8,
        "traditional": serialization.PrivateFormat.TraditionalOpenSSL,
    }
    encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
    if form == "encrypted":
        encryption = serialization.BestAvailableEncryption(b"a-passphrase")
    return key.private_bytes(serialization.Encoding.PEM, formats.get(form, formats["pkcs8"]), encryption)


@pytest.fixture(scope="module")
def rsa_2048() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def keys(tmp_path: Path, rsa_2048: rsa.RSAPrivateKey) -> Path:
    """keys/ beside the file: a good public key and every kind of bad one."""
    folder = tmp_path / "keys"
    folder.mkdir()
    (folder / "billing.pub.pem").write_bytes(public_pem(rsa_2048))
    (folder / "ec.pub.pem").write_bytes(public_pem(ec.generate_private_key(ec.SECP256R1())))
    (folder / "small.pub.pem").write_bytes(public_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    for form in ("pkcs8", "traditional", "encrypted"):
        (folder / f"private-{form}.pem").write_bytes(private_pem(rsa_2048, form))
    (folder / "not-pem.pem").write_text("this is not a key\n", encoding="utf-8")
    return folder


def env(tmp_path: Path, text: str, **values: str | None) -> dict[str, str]:
    path = tmp_path / "sources.toml"
    path.write_text(text, encoding="utf-8")
    base: dict[str, str | None] = {
        "PARTICLE_WEBHOOK_SECRET": PARTICLE,
        "DATA_DIR": str(tmp_path / "data"),
        "SOURCES_FILE": str(path),
        "HOOK_SECRET": HOOK,
        "BILLING_SECRET": SIGNING,
    }
    base.update(values)
    return {k: v for k, v in base.items() if v is not None}


def settings_of(tmp_path: Path, text: str, **values: str | None) -> Settings:
    return load_settings(env(tmp_path, text, **values))


def problems_of(tmp_path: Path, text: str, **values: str | None) -> list[str]:
    environment = env(tmp_path, text, **values)
    with pytest.raises(ConfigError) as caught:
        load_settings(environment)
    message = str(caught.value)
    for secret in (TOKEN, "private-path", SIGNING, PARTICLE, HOOK, *filter(None, values.values())):
        assert secret not in message, message
    return caught.value.problems


def full_problem(path: Path, expected: str) -> str:
    """The whole message: the file, then the table (or nothing, for the file as a whole)."""
    if expected.startswith("["):
        return f"SOURCES_FILE {path} {expected}"
    if expected.startswith(":"):
        return f"SOURCES_FILE {path}{expected}"
    return expected  # a variable's own rule, said by the variable's name as for a source's secret


def without(line: str) -> str:
    return SOURCE + TARGET.replace(line, "")


BAD = [
    pytest.param(SOURCE + TARGET + "colour = 1\n", {}, "[targets.billing]: unknown keys colour", id="unknown-key"),
    pytest.param(without(URL_LINE), {}, "[targets.billing]: url is required", id="no-url"),
    pytest.param(without(SECRET_LINE), {}, "[targets.billing]: secret is required", id="no-secret"),
    pytest.param(without(SOURCES_LINE), {}, "[targets.billing]: sources is required", id="no-sources"),
    pytest.param(
        SOURCE + "[targets.billing]\n" + SOURCES_LINE,
        {},
        "[targets.billing]: url, secret are required",
        id="no-url-no-secret",
    ),
    pytest.param(
        SOURCE + TARGET.replace(SOURCES_LINE, "sources = []\n"),
        {},
        '[targets.billing]: sources must be a non-empty list of source names, or ["*"] for every source',
        id="empty-sources",
    ),
    pytest.param(
        SOURCE + TARGET.replace(SOURCES_LINE, 'sources = "hook"\n'),
        {},
        '[targets.billing]: sources must be a non-empty list of source names, or ["*"] for every source',
        id="sources-not-a-list",
    ),
    pytest.param(
        SOURCE + TARGET.replace(SOURCES_LINE, 'sources = ["hook", "stripe"]\n'),
        {},
        "[targets.billing]: sources names stripe, which is not a source here"
        " (particle and generic count only when their secret is set)",
        id="unknown-source",
    ),
    pytest.param(
        SOURCE + TARGET.replace(SOURCES_LINE, 'sources = ["generic"]\n'),
        {},
        "[targets.billing]: sources names generic, which is not a source here"
        " (particle and generic count only when their secret is set)",
        id="builtin-source-not-enabled",
    ),
    pytest.param(
        SOURCE + TARGET.replace(SECRET_LINE, 'secret = "UNSET_SIGNING_SECRET"\n'),
        {},
        "[targets.billing]: secret variable UNSET_SIGNING_SECRET is not set",
        id="secret-unset",
    ),
    pytest.param(
        SOURCE + TARGET.replace(SECRET_LINE, 'secret = ["BILLING_SECRET"]\n'),
        {},
        "[targets.billing]: secret must be the name of the environment variable that holds its whsec_ signing key",
        id="secret-a-list",
    ),
    pytest.param(
        SOURCE + TARGET,
        {"BILLING_SECRET": SIGNING.removeprefix("whsec_")},
        "[targets.billing]: secret variable BILLING_SECRET must be whsec_ followed by base64",
        id="secret-not-whsec",
    ),
    pytest.param(
        SOURCE + TARGET,
        {"BILLING_SECRET": "whsec_not base64 S3CRET at all!!"},
        "[targets.billing]: secret variable BILLING_SECRET must be whsec_ followed by base64",
        id="secret-not-base64",
    ),
    pytest.param(
        SOURCE + TARGET,
        {"BILLING_SECRET": "whsec_U2VjcmV0"},
        "BILLING_SECRET must be at least 16 characters",
        id="secret-short",
    ),
    pytest.param(
        SOURCE + TARGET + 'encrypt_to = "keys/missing.pem"\n',
        {},
        "[targets.billing]: encrypt_to keys/missing.pem cannot be read (FileNotFoundError)",
        id="key-missing",
    ),
    pytest.param(
        SOURCE + TARGET + 'encrypt_to = "keys/not-pem.pem"\n',
        {},
        "[targets.billing]: encrypt_to keys/not-pem.pem is not a PEM public key",
        id="key-not-pem",
    ),
    pytest.param(
        SOURCE + TARGET + 'encrypt_to = "keys/ec.pub.pem"\n',
        {},
        "[targets.billing]: encrypt_to keys/ec.pub.pem must be an RSA public key (RSA-OAEP-256 wraps the content key)",
        id="key-ec",
    ),
    pytest.param(
        SOURCE + TARGET + 'encrypt_to = "keys/small.pub.pem"\n',
        {},
        "[targets.billing]: encrypt_to keys/small.pub.pem must be an RSA key of at least 2048 bits",
        id="key-1024-bits",
    ),
    *(
        pytest.param(
            SOURCE + TARGET + f'encrypt_to = "keys/private-{form}.pem"\n',
            {},
            f"[targets.billing]: encrypt_to keys/private-{form}.pem is a private key;"
            " it must be the receiver's public key (never copy the private key)",
            id=f"key-private-{form}",
        )
        for form in ("pkcs8", "traditional", "encrypted")
    ),
    pytest.param(
        SOURCE + TARGET + "encrypt_to = 1\n",
        {},
        "[targets.billing]: encrypt_to must be a path to an RSA public key PEM file",
        id="key-not-a-path",
    ),
    *(
        pytest.param(
            SOURCE + TARGET + f"timeout_seconds = {value}\n",
            {},
            "[targets.billing]: timeout_seconds must be a number of seconds, more than 0 and at most 60",
            id=f"timeout-{value}",
        )
        for value in ("0", "61", "300", '"10"', "-1", "true", "60.5")
    ),
    pytest.param(
        SOURCE + TARGET + 'body = "raw"\n', {}, "[targets.billing]: body must be event or payload", id="body-raw"
    ),
    pytest.param(
        SOURCE + TARGET + 'ordered = "yes"\n', {}, "[targets.billing]: ordered must be true or false", id="ordered-yes"
    ),
    *(
        pytest.param(
            SOURCE + TARGET + f"events = {value}\n",
            {},
            "[targets.billing]: events must be a non-empty list of event names or glob patterns",
            id=f"events-{value}",
        )
        for value in ("[]", '[""]', '"invoice.*"')
    ),
    pytest.param(
        SOURCE + TARGET.replace("[targets.billing]", '[targets."Bad Name"]'),
        {},
        "[targets]: a target's name must be lowercase letters, digits, - or _",
        id="bad-name",
    ),
    pytest.param(
        '[sources."Bad Name"]\nscheme = "bearer"\nsecrets = ["HOOK_SECRET"]\n'
        + TARGET.replace(SOURCES_LINE, 'sources = ["particle"]\n'),
        {},
        "[sources]: a source's name must be lowercase letters, digits, - or _",
        id="bad-source-name",
    ),
    pytest.param(SOURCE + "[targets]\n", {}, "[targets]: must declare at least one [targets.<name>] table", id="empty"),
    pytest.param("", {}, ": must declare at least one [sources.<name>] or [targets.<name>] table", id="empty-file"),
    pytest.param(
        "# only a comment\n",
        {},
        ": must declare at least one [sources.<name>] or [targets.<name>] table",
        id="comment-only-file",
    ),
]


@pytest.mark.parametrize(("text", "values", "expected"), BAD)
def test_each_bad_target_value_is_refused_by_file_table_and_key(
    tmp_path: Path, keys: Path, text: str, values: dict[str, str], expected: str
) -> None:
    assert problems_of(tmp_path, text, **values) == [full_problem(tmp_path / "sources.toml", expected)]


BAD_URLS = [
    f"ftp://billing.example.com/x?token={TOKEN}",
    f"/hooks?token={TOKEN}",
    f"billing.example.com/hooks?token={TOKEN}",
    f"https:///hooks?token={TOKEN}",
    f"https://user:{TOKEN}@/hooks",
    f"http://billing.example.com:99999/?token={TOKEN}",
    f"http://[::1/?token={TOKEN}",
    f"https://billing.example.com/a b?token={TOKEN}",
    f"file:///etc/passwd?token={TOKEN}",
    "",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_url_that_is_not_absolute_http_is_refused_without_being_quoted(tmp_path: Path, url: str) -> None:
    problems = problems_of(tmp_path, SOURCE + TARGET.replace(URL_LINE, f'url = "{url}"\n'))
    path = tmp_path / "sources.toml"
    assert problems == [
        f"SOURCES_FILE {path} [targets.billing]: url must be an absolute http:// or https:// URL with a host"
    ]


def test_a_full_target_table(tmp_path: Path, keys: Path) -> None:
    text = SOURCE + TARGET.replace(SOURCES_LINE, 'sources = ["hook", "particle"]\n')
    text += 'events = ["invoice.*", "charge.?"]\nencrypt_to = "keys/billing.pub.pem"\n'
    text += 'ordered = true\ntimeout_seconds = 2.5\nbody = "payload"\n'
    target = settings_of(tmp_path, text).targets["billing"]
    assert (target.name, target.url, target.secret, target.secret_name) == ("billing", URL, SIGNING, "BILLING_SECRET")
    assert target.sources == ("hook", "particle") and target.events == ("invoice.*", "charge.?")
    assert target.ordered is True and target.timeout_seconds == 2.5 and target.body == "payload"
    assert target.encrypt_to["kty"] == "RSA" and not target.encrypt_to.has_private
    assert target.takes("hook", "invoice.paid") and target.takes("particle", "charge.x")
    assert not target.takes("hook", "customer.created") and not target.takes("generic", "invoice.paid")


def test_an_absolute_key_path_and_plain_http_are_accepted(tmp_path: Path, keys: Path) -> None:
    text = SOURCE + TARGET.replace(URL_LINE, 'url = "http://[::1]:8080/in"\n')
    text += f'encrypt_to = "{keys / "billing.pub.pem"}"\ntimeout_seconds = 60\n'
    target = settings_of(tmp_path, text).targets["billing"]
    assert target.encrypt_to is not None and target.timeout_seconds == 60.0


def test_a_file_of_targets_only_forwards_the_builtin_sources_with_the_defaults(tmp_path: Path) -> None:
    text = f'[targets.all]\nurl = "{URL}"\nsources = ["particle", "generic"]\nsecret = "BILLING_SECRET"\n'
    settings = settings_of(tmp_path, text, WEBHOOK_SECRET=GENERIC)
    assert sorted(settings.sources) == ["generic", "particle"]
    assert settings.targets == {
        "all": Target("all", URL, SIGNING, ("particle", "generic"), secret_name="BILLING_SECRET"),
    }
    target = settings.targets["all"]
    assert target.events is None and target.encrypt_to is None and target.ordered is False
    assert target.timeout_seconds == 10.0 and target.body == "event"


def test_a_star_takes_every_source(tmp_path: Path) -> None:
    text = SOURCE + TARGET.replace(SOURCES_LINE, 'sources = ["*"]\n')
    target = settings_of(tmp_path, text).targets["billing"]
    assert target.sources == ("*",) and target.takes("hook", "x") and target.takes("particle", "y")


def test_no_sources_file_means_no_targets(tmp_path: Path) -> None:
    assert load_settings({"PARTICLE_WEBHOOK_SECRET": PARTICLE, "DATA_DIR": str(tmp_path)}).targets == {}


def test_a_target_secret_variable_counts_as_read_not_as_a_typo(tmp_path: Path) -> None:
    text = SOURCE + TARGET.replace(SECRET_LINE, 'secret = "WEBHOOK_BILLING_SIGNING"\n')
    settings = settings_of(tmp_path, text, WEBHOOK_BILLING_SIGNING=SIGNING)
    assert settings.targets["billing"].secret_name == "WEBHOOK_BILLING_SIGNING"
    assert settings.warnings == ()


def test_a_secret_from_a_file_is_read_like_any_other(tmp_path: Path) -> None:
    (tmp_path / "signing").write_text(SIGNING + "\n", encoding="utf-8")
    settings = settings_of(
        tmp_path, SOURCE + TARGET, BILLING_SECRET=None, BILLING_SECRET_FILE=str(tmp_path / "signing")
    )
    assert settings.targets["billing"].secret == SIGNING


# --------------------------------------------------------------------------- the commands


def cli_env(tmp_path: Path, keys: Path) -> dict[str, str]:
    text = SOURCE + TARGET.replace(SOURCES_LINE, 'sources = ["hook", "particle"]\n')
    text += 'events = ["invoice.*"]\nencrypt_to = "keys/billing.pub.pem"\nordered = true\ntimeout_seconds = 2.5\n'
    text += f'[targets.audit]\nurl = "https://ops:{TOKEN}@audit.example.com:8443/in?key={TOKEN}"\n'
    text += 'sources = ["*"]\nsecret = "BILLING_SECRET"\n'
    text += (
        f'[targets.generic-only]\nurl = "{URL}"\nsources = ["generic"]\nsecret = "BILLING_SECRET"\nbody = "payload"\n'
    )
    return env(tmp_path, text, WEBHOOK_SECRET=GENERIC)


def run(environment: dict[str, str], *args: str) -> str:
    result = CliRunner().invoke(main, list(args), env=environment)
    assert result.exit_code == 0, result.output
    return result.output


def test_check_config_prints_each_target_without_its_path_query_or_secret(tmp_path: Path, keys: Path) -> None:
    output = run(cli_env(tmp_path, keys), "check-config")
    assert (
        "  target billing: to https://billing.example.com; sources hook, particle; events invoice.*;"
        " ordered; encrypted; body event; timeout 2.5 s\n" in output
    )
    assert "  target audit: to https://audit.example.com:8443; sources *; every event; body event; timeout 10 s\n" in (
        output
    )
    assert "  target generic-only: to https://billing.example.com; sources generic; every event; body payload" in output
    for secret in (TOKEN, "private-path", "/in?", "ops:", SIGNING):
        assert secret not in output


def test_sources_json_lists_the_targets_of_each_source(tmp_path: Path, keys: Path) -> None:
    environment = cli_env(tmp_path, keys)
    described = {d["name"]: d for d in map(json.loads, run(environment, "sources", "--json").splitlines())}
    assert described["hook"]["targets"] == ["audit", "billing"]
    assert described["particle"]["targets"] == ["audit", "billing"]
    assert described["generic"]["targets"] == ["audit", "generic-only"]
    table = run(environment, "sources")
    assert "hook: bearer at /webhook/hook (forwarded to: audit, billing)" in table
    assert TOKEN not in table and SIGNING not in table


def test_the_commented_target_in_the_shipped_example_is_valid_once_uncommented(tmp_path: Path, keys: Path) -> None:
    example = (Path(__file__).parent.parent / "examples" / "sources.toml").read_text(encoding="utf-8")
    head, _, commented = example.partition("# [targets.billing]")
    text = head + "[targets.billing]" + "\n".join(line.removeprefix("# ") for line in commented.splitlines())
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "github.json").write_text('{"type": "object"}', encoding="utf-8")
    settings = settings_of(
        tmp_path, text, GITHUB_SECRET=HOOK, BILLING_SIGNING_SECRET=SIGNING, BILLING_SECRET=None, HOOK_SECRET=None
    )
    target = settings.targets["billing"]
    assert target.sources == ("github", "particle") and target.encrypt_to is not None and target.body == "event"
