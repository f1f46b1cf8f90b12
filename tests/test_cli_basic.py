"""The command line, with click's CliRunner: gen-secret, init, check-config, send."""

from __future__ import annotations

import re
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from dotenv import dotenv_values
from werkzeug.serving import make_server

from tests.conftest import PARTICLE_SECRET, WEBHOOK_SECRET
from webhook_server import create_app
from webhook_server.cli import main

TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


# --------------------------------------------------------------------------- gen-secret


def test_gen_secret_prints_one_long_url_safe_secret() -> None:
    result = run("gen-secret")
    assert result.exit_code == 0
    secret = result.output.strip()
    assert result.output.count("\n") == 1
    assert TOKEN.match(secret)
    assert len(secret) >= 43  # 32 random bytes


def test_gen_secret_is_different_every_time() -> None:
    secrets = {run("gen-secret").output.strip() for _ in range(20)}
    assert len(secrets) == 20


@pytest.mark.parametrize(("nbytes", "length"), [("16", 22), ("64", 86)])
def test_gen_secret_bytes_option(nbytes: str, length: int) -> None:
    result = run("gen-secret", "--bytes", nbytes)
    assert result.exit_code == 0
    assert len(result.output.strip()) == length


@pytest.mark.parametrize("nbytes", ["8", "15", "257", "many"])
def test_gen_secret_refuses_too_few_bytes(nbytes: str) -> None:
    assert run("gen-secret", "--bytes", nbytes).exit_code == 2


# --------------------------------------------------------------------------- init


def test_init_writes_a_private_env_whose_secrets_match_the_output(tmp_path: Path) -> None:
    result = run("init")
    assert result.exit_code == 0, result.output
    path = tmp_path / ".env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    values = dotenv_values(path)
    printed = dict(re.findall(r"^\s*(PARTICLE_WEBHOOK_SECRET|WEBHOOK_SECRET)=(\S+)$", result.output, re.MULTILINE))
    assert printed == {
        "PARTICLE_WEBHOOK_SECRET": values["PARTICLE_WEBHOOK_SECRET"],
        "WEBHOOK_SECRET": values["WEBHOOK_SECRET"],
    }
    secrets = [values["PARTICLE_WEBHOOK_SECRET"], values["WEBHOOK_SECRET"], values["FLASK_SECRET_KEY"]]
    assert all(s and len(s) >= 32 for s in secrets)
    assert len(set(secrets)) == 3
    assert "webhook-server send" in result.output


def test_init_never_overwrites(tmp_path: Path) -> None:
    assert run("init").exit_code == 0
    before = (tmp_path / ".env").read_bytes()
    again = run("init")
    assert again.exit_code != 0
    assert "exists" in again.output
    assert (tmp_path / ".env").read_bytes() == before


def test_init_never_overwrites_a_file_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MINE=1\n", encoding="utf-8")
    assert run("init").exit_code != 0
    assert (tmp_path / ".env").read_text(encoding="utf-8") == "MINE=1\n"


def test_init_to_another_path(tmp_path: Path) -> None:
    result = run("init", "--path", "deploy.env")
    assert result.exit_code == 0
    assert stat.S_IMODE((tmp_path / "deploy.env").stat().st_mode) == 0o600
    assert not (tmp_path / ".env").exists()


def test_init_then_check_config_passes(tmp_path: Path) -> None:
    assert run("init").exit_code == 0
    result = run("check-config")
    assert result.exit_code == 0, result.output
    assert "Configuration is valid." in result.output
    assert "source particle" in result.output and "source generic" in result.output
    secrets = dotenv_values(tmp_path / ".env")
    for name in ("PARTICLE_WEBHOOK_SECRET", "WEBHOOK_SECRET", "FLASK_SECRET_KEY"):
        assert str(secrets[name]) not in result.output


# --------------------------------------------------------------------------- check-config


def test_check_config_valid() -> None:
    result = run("check-config", env={"PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET})
    assert result.exit_code == 0
    assert "Configuration is valid." in result.output
    assert PARTICLE_SECRET not in result.output


@pytest.mark.parametrize(
    ("env", "name", "value"),
    [
        ({"PARTICLE_WEBHOOK_SECRET": "Sh0rt-S3CRET-q"}, "PARTICLE_WEBHOOK_SECRET", "Sh0rt-S3CRET-q"),
        (
            {"PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET, "MAX_PAYLOAD_BYTES": "huge-S3CRET"},
            "MAX_PAYLOAD_BYTES",
            "huge-S3CRET",
        ),
        (
            {"PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET, "SMTP_EMAIL": "me@example.com"},
            "RECIPIENT_EMAIL",
            PARTICLE_SECRET,
        ),
        ({}, "PARTICLE_WEBHOOK_SECRET", "(none)"),
    ],
    ids=["short-secret", "bad-number", "smtp-without-recipients", "no-source"],
)
def test_check_config_invalid_exits_2_naming_the_variable(env: dict[str, str], name: str, value: str) -> None:
    result = run("check-config", env=env)
    assert result.exit_code == 2
    assert name in result.output
    assert value not in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- send


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_send_to_nothing_listening_fails_clearly() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    result = run(
        "send", "--url", url, "--timeout", "5", '{"event": "motion"}', env={"PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET}
    )
    assert result.exit_code != 0
    assert "cannot reach" in result.output and url in result.output
    assert PARTICLE_SECRET not in result.output


@pytest.mark.parametrize(
    ("args", "hint"),
    [(["not json"], "PAYLOAD"), (["--source", "nope", "{}"], "--source")],
    ids=["bad-json", "unknown-source"],
)
def test_send_usage_errors(args: list[str], hint: str) -> None:
    result = CliRunner().invoke(main, ["send", *args], env={"PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET})
    assert result.exit_code == 2
    assert hint in result.output


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[str]:
    """The app on a real socket (Werkzeug's server in a thread), configured like the CLI."""
    env = {
        "PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "DATA_DIR": str(tmp_path / "data"),
    }
    app = create_app(env)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=5)


@pytest.mark.parametrize("source", [None, "particle", "generic"])
def test_send_signs_like_the_sender_and_is_accepted(live_server: str, tmp_path: Path, source: str | None) -> None:
    env = {
        "PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "DATA_DIR": str(tmp_path / "data"),
    }
    args = [
        "send",
        "--url",
        live_server,
        *(["--source", source] if source else []),
        '{"event": "motion", "data": "front door"}',
    ]
    result = run(*args, env=env)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("202 ")
    assert '"accepted"' in result.output


def test_send_reports_a_refusal(live_server: str, tmp_path: Path) -> None:
    env = {"PARTICLE_WEBHOOK_SECRET": "some-other-secret-0123456789", "DATA_DIR": str(tmp_path / "other")}
    result = run("send", "--url", live_server, "{}", env=env)
    assert result.exit_code == 1
    assert result.output.startswith("401 ")


def test_the_env_init_writes_can_be_sourced_by_a_shell(tmp_path: Path) -> None:
    import subprocess

    path = tmp_path / ".env"
    assert run("init", "--path", str(path)).exit_code == 0
    printed = subprocess.run(
        ["bash", "-c", 'set -a; . "$1"; printf "%s\\n" "$RATE_LIMIT" "$PARTICLE_WEBHOOK_SECRET"', "-", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert printed.stderr == ""
    rate, secret = printed.stdout.splitlines()
    values = dotenv_values(path)
    assert rate == values["RATE_LIMIT"] == "60/minute;20/second"
    assert secret == values["PARTICLE_WEBHOOK_SECRET"]


def test_check_config_warns_about_a_misspelled_variable(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["check-config"],
        env={"PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET, "DATA_DIR": str(tmp_path), "SMTP_EMIAL": "me@example.com"},
    )
    assert result.exit_code == 0
    assert "warning: SMTP_EMIAL is not a setting and is ignored; did you mean SMTP_EMAIL?" in result.output
