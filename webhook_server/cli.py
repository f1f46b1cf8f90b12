"""The `webhook-server` command line."""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
from psycopg.conninfo import conninfo_to_dict

from webhook_server.delivery.queue import DeliveryQueue
from webhook_server.delivery.worker import SignalStop, Worker
from webhook_server.ingest.send import send_test_event
from webhook_server.ingest.targets import Target, origin
from webhook_server.live import listen as live_listen
from webhook_server.ops import audit as audit_view
from webhook_server.ops import events as stored_events
from webhook_server.ops import supervisor
from webhook_server.ops.logs import configure_logging
from webhook_server.ops.metrics import ensure_multiprocess_dir
from webhook_server.ops.ports import PortInUse, check_free
from webhook_server.settings import SETTINGS, ConfigError, Settings, settings_from_environment
from webhook_server.store.base import STORE_ERRORS, EventStore
from webhook_server.store.extension import COMMAND_POOL_SIZE, open_store

GUNICORN_CONFIG = "python:webhook_server.gunicorn_conf"
APP_SPEC = "webhook_server:create_app()"


def port_free_or_exit(host: str, port: int) -> None:
    """Exit with status 2 and a message naming the port when something listens there."""
    try:
        check_free(host, port)
    except PortInUse as exc:
        click.echo(f"webhook-server: not starting: {exc}; stop it or choose another --port", err=True)
        sys.exit(2)


def load_or_exit() -> Settings:
    """The configuration, or a clear message naming each bad variable and exit status 2."""
    try:
        settings = settings_from_environment()
    except ConfigError as exc:
        click.echo(f"webhook-server: {exc}", err=True)
        sys.exit(2)
    for warning in settings.warnings:
        click.echo(f"webhook-server: warning: {warning}", err=True)
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="webhook-server")
def main() -> None:
    """Self-hosted webhook alert receiver."""


def gunicorn_command(host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        GUNICORN_CONFIG,
        "--bind",
        f"{host}:{port}",
        APP_SPEC,
    ]


def metrics_environment(settings: Settings, clear: bool = False) -> None:
    """PROMETHEUS_MULTIPROC_DIR (default <DATA_DIR>/prometheus) in the environment before any
    child starts or any metric is made, so every process's counts add up (see metrics.py)."""
    ensure_multiprocess_dir(settings.data_dir, clear=clear)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
def web(host: str, port: int) -> None:
    """Only the web half: Gunicorn with the app (sends nothing)."""
    settings = load_or_exit()
    port_free_or_exit(host, port)
    metrics_environment(settings)
    command = gunicorn_command(host, port)
    os.execv(command[0], command)  # noqa: S606 - replace this process, so signals reach Gunicorn


@main.command()
def worker() -> None:
    """Only the delivery worker: sends notifications for stored events."""
    settings = load_or_exit()
    metrics_environment(settings)
    configure_logging(settings.log_level)
    stop = SignalStop()
    signal.signal(signal.SIGTERM, stop.set)
    signal.signal(signal.SIGINT, stop.set)
    Worker(settings).run(stop)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
def serve(host: str, port: int) -> None:
    """Everything on this host: Gunicorn with the app, and the delivery worker."""
    settings = load_or_exit()
    port_free_or_exit(host, port)  # before anything of a running server's is touched
    metrics_environment(settings, clear=True)
    target = f"email via {settings.smtp.host}" if settings.smtp else "the log (no SMTP configured)"
    click.echo(
        f"webhook-server: listening on http://{host}:{port} with sources {', '.join(sorted(settings.sources))};"
        f" notifications go to {target}",
        err=True,
    )
    # Become the lean supervisor (same pid, so signals sent to `serve` still reach it): what was
    # imported to validate the settings would otherwise stay in this process for its whole life.
    sys.stdout.flush()
    sys.stderr.flush()
    argv = supervisor.command(gunicorn_command(host, port), [sys.executable, "-m", "webhook_server", "worker"])
    os.execv(argv[0], argv)  # noqa: S606


ENV_HEADER = """\
# webhook-server configuration, written by `webhook-server init` on {date}.
# Every variable is described in README.md. This file holds secrets: keep it private (mode 600).
# Values are quoted, so `set -a; . ./.env` works in a shell as well.
"""


def env_template(fresh: dict[str, str]) -> str:
    """The `.env` that `init` writes, from the settings table: fresh secrets, safe defaults and
    commented examples. `fresh` maps each secret's name to its new value."""
    lines = [ENV_HEADER.format(date=time.strftime("%Y-%m-%d"))]
    for setting in SETTINGS:
        if setting.init is None:
            continue
        value = fresh[setting.name] if setting.init == "secret" else setting.example or str(setting.default)
        prefix = "# " if setting.init == "comment" else ""
        lines.append(f'# {setting.help}\n{prefix}{setting.name}="{value}"\n')
    return "\n".join(lines)


@main.command()
@click.option("--path", default=".env", show_default=True, type=click.Path(dir_okay=False))
def init(path: str) -> None:
    """Write a first .env with fresh secrets (never overwrites one)."""
    fresh = {s.name: secrets.token_urlsafe(32) for s in SETTINGS if s.init == "secret"}
    text = env_template(fresh)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        click.echo(f"webhook-server: {path} already exists; not overwriting it.", err=True)
        sys.exit(1)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    click.echo(
        f"Wrote {Path(path).resolve()} (mode 600) with fresh secrets. They are shown only this once:\n\n"
        f"  PARTICLE_WEBHOOK_SECRET={fresh['PARTICLE_WEBHOOK_SECRET']}\n"
        f"  WEBHOOK_SECRET={fresh['WEBHOOK_SECRET']}\n\n"
        "Start the server:         webhook-server serve\n"
        'Send a first test event:  webhook-server send \'{"event": "motion", "data": "front door"}\'\n'
        "Notifications go to the log until you set SMTP_EMAIL (or SMTP_HOST) and RECIPIENT_EMAIL."
    )


@main.command("gen-secret")
@click.option("--bytes", "nbytes", default=32, show_default=True, type=click.IntRange(16, 256))
def gen_secret(nbytes: int) -> None:
    """Print a new high-entropy secret."""
    click.echo(secrets.token_urlsafe(nbytes))


@main.command()
@click.option(
    "--source",
    "source_name",
    default=None,
    help="Source to sign for (default: particle, else generic).",
)
@click.option("--url", default="http://127.0.0.1:5000", show_default=True, help="The server's base URL.")
@click.option("--timeout", default=10.0, show_default=True)
@click.argument("payload", default="{}")
def send(source_name: str | None, url: str, timeout: float, payload: str) -> None:
    """Sign and send a test event the way the source's sender would."""
    settings = load_or_exit()
    try:
        document: Any = json.loads(payload)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="PAYLOAD") from None
    name = source_name or ("particle" if "particle" in settings.sources else next(iter(sorted(settings.sources))))
    if name not in settings.sources:
        raise click.BadParameter(f"no enabled source named {name!r}", param_hint="--source")
    status, body = send_test_event(settings.sources[name], url, document, timeout)
    click.echo(f"{status} {body}")
    sys.exit(0 if 200 <= status < 300 else 1)


@main.command()
@click.argument("channel")
@click.option("--url", required=True, help="The server's base URL.")
@click.option("--token", required=True, help="A token that may read the channel (sent as a Bearer token).")
@click.option("--forward", default=None, metavar="URL", help="POST each event, as received, to this local URL.")
@click.option(
    "--state",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where the position is kept (default: one file per URL, channel and --forward in the state directory).",
)
@click.option("--json", "json_output", is_flag=True, help="Print each event's JSON object, one per line.")
def listen(channel: str, url: str, token: str, forward: str | None, state: Path | None, json_output: bool) -> None:
    """Follow a channel's live stream: print each event, or forward it to a local app."""
    options = live_listen.Options(url, channel, token, forward=forward, state=state, json_output=json_output)
    sys.exit(live_listen.main(options))


@main.command("check-config")
def check_config() -> None:
    """Validate the configuration and say what is wrong, without starting."""
    settings = load_or_exit()
    click.echo("Configuration is valid.")
    for name, source in sorted(settings.sources.items()):
        only = f", notifies {', '.join(source.events)} only" if source.events else ""
        window = f", cool-down {source.cooldown_seconds} s" if source.cooldown_seconds is not None else ""
        click.echo(f"  source {name}: {source.scheme}, {len(source.secrets)} secret(s){only}{window}")
    for name, target in sorted(settings.targets.items()):
        click.echo(f"  target {name}: {describe_target(target)}")
    if settings.smtp:
        smtp = settings.smtp
        click.echo(f"  email: {smtp.host}:{smtp.port} ({smtp.security}) to {len(settings.recipients)} recipient(s)")
    else:
        click.echo("  email: not configured; notifications are written to the log")
    if settings.subscriber_tokens:
        channels = sorted({c for opens in settings.subscriber_tokens.values() for c in opens})
        click.echo(f"  live stream: {len(settings.subscriber_tokens)} token(s) for channels {', '.join(channels)}")
    else:
        click.echo("  live stream: off (no SUBSCRIBER_TOKENS)")
    click.echo(f"  store: {describe_store(settings)}")
    counters = "redis" if settings.redis_url else f"shared counters in the {store_kind(settings)} store"
    click.echo(f"  rate limit: {settings.rate_limit} ({counters})")


def store_of(settings: Settings, pool_size: int = COMMAND_POOL_SIZE) -> EventStore:
    """The configured store, for one command."""
    return open_store(settings.database_url, settings.database_path, pool_size)


def store_kind(settings: Settings) -> str:
    return "PostgreSQL" if settings.database_url else "SQLite"


def describe_store(settings: Settings) -> str:
    """Where the store is, never with the URL's password."""
    if not settings.database_url:
        return f"SQLite at {settings.database_path}"
    parts = conninfo_to_dict(settings.database_url)  # read once already (values.database_url)
    return f"PostgreSQL at {parts.get('host') or 'localhost'}:{parts.get('port') or 5432}/{parts.get('dbname') or ''}"


@main.command("ping-store")
def ping_store() -> None:
    """Exit 0 when the configured store answers a read, 1 when not (the worker's health check)."""
    settings = load_or_exit()
    try:
        answered = store_of(settings, pool_size=1).ping()
    except STORE_ERRORS as exc:
        click.echo(f"the store ({describe_store(settings)}) does not answer: {exc}", err=True)
        sys.exit(1)
    if not answered:
        click.echo(f"the store ({describe_store(settings)}) does not answer", err=True)
        sys.exit(1)
    click.echo(f"the store answers ({describe_store(settings)})")


def describe_target(target: Target) -> str:
    """One line for `check-config`: never the URL's path or query, nor the secret (either may be a token)."""
    parts = [f"to {origin(target.url)}", f"sources {', '.join(target.sources)}"]
    parts.append(f"events {', '.join(target.events)}" if target.events else "every event")
    parts += ["ordered"] if target.ordered else []
    parts += ["encrypted"] if target.encrypt_to is not None else []
    parts += [f"body {target.body}", f"timeout {target.timeout_seconds:g} s"]
    return "; ".join(parts)


@main.group("events", invoke_without_command=True)
@click.option("--source", default=None, help="Only this source's events.")
@click.option(
    "--since", "since_text", default=None, metavar="ID|DURATION", help="After an id, or within 90s, 15m, 2h, 7d."
)
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True, help="One JSON object (the event JSON) per line.")
@click.pass_context
def events(ctx: click.Context, source: str | None, since_text: str | None, limit: int, as_json: bool) -> None:
    """List stored events, newest first (or `events show ID`)."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        since = stored_events.parse_since(since_text) if since_text else stored_events.Since()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    settings = load_or_exit()
    found = stored_events.list_events(store_of(settings), source, since, limit)
    if as_json:
        for event, _state in found:
            click.echo(json.dumps(event.as_dict(), ensure_ascii=False))
        return
    click.echo(f"{'id':>8}  {'received (UTC)':<27}  {'source':<12}  {'event':<20}  {'device':<24}  notification")
    for event, state in found:
        line = f"{event.id:>8}  {event.received_at:<27}  {event.source[:12]:<12}  {event.event[:20]:<20}"
        click.echo(f"{line}  {(event.device or '-')[:24]:<24}  {state}")
    if not found:
        click.echo("No events.")


@events.command("show")
@click.argument("event_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="The whole event as one JSON object.")
def events_show(event_id: int, as_json: bool) -> None:
    """One event whole: payload, kept headers, raw body, deliveries."""
    settings = load_or_exit()
    document = stored_events.show(store_of(settings), event_id)
    if document is None:
        click.echo(f"webhook-server: no event {event_id} (see `webhook-server events`)", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(document, ensure_ascii=False))
        return
    for key in ("id", "source", "received_at", "event", "device", "content_type"):
        click.echo(f"{key + ':':<14}{document[key] if document[key] is not None else '-'}")
    click.echo("headers:")
    for name, value in document["headers"]:
        click.echo(f"  {name}: {value}")
    click.echo("payload:\n" + json.dumps(document["payload"], ensure_ascii=False, indent=2))
    click.echo("deliveries:" + ("" if document["deliveries"] else " none"))
    for d in document["deliveries"]:
        error = f"  ({d['last_error']})" if d["last_error"] else ""
        click.echo(f"  {d['kind']} by {d['channel']} to {d['recipient']}: {d['state']}, {d['tries']} tries{error}")


@events.command("replay")
@click.argument("event_id", type=int)
def events_replay(event_id: int) -> None:
    """Run an event's notifications again, as new deliveries (the worker sends them)."""
    count = _queue().replay_event(event_id)
    if count is None:
        click.echo(f"webhook-server: no event {event_id} (see `webhook-server events`)", err=True)
        sys.exit(1)
    click.echo(f"Queued {count} new deliveries for event {event_id}; the delivery worker sends them.")


@main.command("audit")
@click.option("--source", default=None, help="Only this source's records.")
@click.option("--status", type=click.IntRange(100, 599), default=None, metavar="CODE", help="Only this status.")
@click.option("--since", default=None, metavar="DURATION", help="Within 90s, 15m, 2h, 7d.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit(source: str | None, status: int | None, since: str | None, limit: int, as_json: bool) -> None:
    """Every request to a webhook endpoint, newest first: accepted or refused, and why."""
    settings = load_or_exit()
    try:
        found = audit_view.records(store_of(settings), source, status, since, limit)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    if as_json:
        for entry in found:
            click.echo(json.dumps(entry, ensure_ascii=False))
        return
    click.echo(
        f"{'time (UTC)':<24}  {'source':<12}  {'client':<15}  status  {'ms':>7}  {'event':>7}  key       count  reason"
    )
    for e in found:
        line = f"{e['time']:<24}  {(e['source'] or '-')[:12]:<12}  {(e['client'] or '-')[:15]:<15}  {e['status']:>6}"
        line += f"  {e['duration_ms']:>7.1f}  {e['event_id'] or '-':>7}  {e['key'] or '-':<8}  {e['count']:>5}"
        click.echo(f"{line}  {e['reason'] or ''}")
    if not found:
        click.echo("No audit records.")


@main.command("sources")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per source, one per line.")
def sources(as_json: bool) -> None:
    """Each source: scheme, path, and each secret's fingerprint with its last match and count."""
    settings = load_or_exit()
    described = audit_view.describe_sources(settings.sources, store_of(settings), settings.targets)
    if as_json:
        for entry in described:
            click.echo(json.dumps(entry, ensure_ascii=False))
        return
    for entry in described:
        targets = ", ".join(entry["targets"]) or "none"
        click.echo(f"{entry['name']}: {entry['scheme']} at {entry['path']} (forwarded to: {targets})")
        for secret in entry["secrets"]:
            count = secret["matches"]
            uses = f"{count:>8} match{'' if count == 1 else 'es'}, last {secret['last_match'] or 'never'}"
            click.echo(f"  {secret['fingerprint']}  {secret['variable'] or '-':<28}  {uses}")


@main.group("dead-letters", invoke_without_command=True)
@click.pass_context
def dead_letters(ctx: click.Context) -> None:
    """List (default) or replay deliveries that ran out of retries."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(dead_letters_list)


def _queue() -> DeliveryQueue:
    settings = load_or_exit()
    return DeliveryQueue(store_of(settings), settings)


@dead_letters.command("list")
def dead_letters_list() -> None:
    """Show every dead letter."""
    letters = _queue().dead_letters()
    if not letters:
        click.echo("No dead letters.")
        return
    header = f"{'delivery':>8}  {'event':>8}  {'name':<20}  {'channel':<7}  {'recipient':<32}"
    click.echo(f"{header}  {'tries':>5}  last error")
    for d in letters:
        name, recipient, error = d.event[:20], d.recipient[:32], d.last_error[:80]
        line = f"{d.delivery_id:>8}  {d.event_id:>8}  {name:<20}  {d.channel:<7}  {recipient:<32}"
        click.echo(f"{line}  {d.tries:>5}  {error}")


@dead_letters.command("replay")
@click.argument("delivery_ids", nargs=-1, type=int)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
def dead_letters_replay(delivery_ids: tuple[int, ...], replay_all: bool) -> None:
    """Queue dead letters again, as new deliveries."""
    if bool(delivery_ids) == replay_all:
        raise click.UsageError("give delivery ids, or --all")
    count = _queue().replay(None if replay_all else list(delivery_ids))
    click.echo(f"Replayed {count} dead letter(s).")
    if delivery_ids and count < len(delivery_ids):
        click.echo("Some ids were not dead letters; see `webhook-server dead-letters list`.", err=True)
        sys.exit(1)
