"""`webhook-server listen`: follow a channel's live stream, print or forward each event, resume after any break.

The position (the last handled event id) is kept in a state file and saved only once an event was
handled: printed, or answered 2xx by the local app for `--forward`. Every (re)connection sends it
as `Last-Event-ID`, so the server sends what was missed before the live tail: no gap, no repeat.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn
from urllib.parse import SplitResult, quote, urlsplit

IDLE_TIMEOUT = 60.0  # seconds without a byte, heartbeats included, before the connection counts as dead
FORWARD_TIMEOUT = 30.0
PAYLOAD_WIDTH = 200  # characters of the payload on a printed line
# Not passed on to the local app: hop-by-hop headers, and those this client sets itself.
SKIPPED_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-type",
        "x-webhook-event-id",
    }
)
FATAL_STATUSES = {
    401: "the server refused the token",
    403: "this token may not read that channel",
    404: "no such channel, or live streams are off on the server",
}


class Fatal(Exception):
    """A problem retrying cannot fix: listen stops with exit status 2."""


class Stopped(Exception):
    """A stop signal (Ctrl-C or SIGTERM) arrived; the exit status is 128 + its number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Turns SIGINT and SIGTERM into Stopped, held back while an event is being recorded.

    Printing an event and saving its position go together: a stop that fell between them would show
    the event again after a restart, so it waits the few microseconds until the position is saved."""

    def __init__(self) -> None:
        self.holding = False
        self.pending: int | None = None

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.received)

    def received(self, signum: int, frame: FrameType | None) -> None:
        if self.holding:
            self.pending = signum
        else:
            raise Stopped(signum)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold a stop back for the block; raise it once the block is done."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        pending, self.pending = self.pending, None
        if pending is not None:
            raise Stopped(pending)


class Retry(Exception):
    """A problem worth retrying after a pause; `delay` is the server's Retry-After, if any."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay


@dataclass(frozen=True)
class Options:
    """What `webhook-server listen` was asked to do."""

    url: str
    channel: str
    token: str
    forward: str | None = None
    state: Path | None = None
    json_output: bool = False
    idle_timeout: float = IDLE_TIMEOUT


@dataclass
class Backoff:
    """Exponential backoff with jitter: base doubling up to cap, each delay within ±jitter."""

    base: float = 0.5
    cap: float = 30.0
    jitter: float = 0.2
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next(self, at_least: float = 0.0) -> float:
        """The next delay in seconds (never below `at_least`, e.g. a Retry-After, before jitter)."""
        delay = min(self.cap, self.base * 2.0 ** min(self.attempt, 30))
        self.attempt += 1
        return max(at_least, delay) * self.rng.uniform(1 - self.jitter, 1 + self.jitter)

    def reset(self) -> None:
        """Start again from the base delay (after a healthy connection or a handled event)."""
        self.attempt = 0


@dataclass(frozen=True)
class Message:
    """One server-sent event."""

    id: str | None
    event: str
    data: str


class SSEParser:
    """Lines of a text/event-stream in, messages out (comment lines are skipped)."""

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self.id: str | None = None
        self.event = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> Message | None:
        """Take one line; a blank line ends a message, which is returned."""
        line = line.rstrip("\r\n")
        if not line:
            message = Message(self.id, self.event, "\n".join(self.data)) if self.data else None
            self._clear()
            return message
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self.data.append(value)
        elif name == "event":
            self.event = value or "message"
        elif name == "id" and "\0" not in value:
            self.id = value
        return None


# ----------------------------------------------------------------------------- the state file


def state_directory() -> Path:
    """$XDG_STATE_HOME/webhook-server, or ~/.local/state/webhook-server."""
    base = os.environ.get("XDG_STATE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / "webhook-server"


def default_state_path(url: str, channel: str, forward: str | None) -> Path:
    """One state file per server URL, channel and forward URL."""
    key = "\0".join((url.rstrip("/"), channel, forward or ""))
    return state_directory() / f"listen-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def load_cursor(path: Path) -> str | None:
    """The last handled event id kept in the state file, or None when there is none yet."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise Fatal(f"cannot read the state file {path}: {exc}") from None
    cursor = document.get("last_id") if isinstance(document, dict) else None
    return None if cursor is None else str(cursor)


def save_cursor(path: Path, options: Options, cursor: str) -> None:
    """Replace the state file atomically (a crash leaves the old or the new one, never half)."""
    document = {"url": options.url, "channel": options.channel, "forward": options.forward, "last_id": cursor}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp")
    temporary.write_text(json.dumps(document) + "\n", encoding="utf-8")
    os.replace(temporary, path)


# ----------------------------------------------------------------------------- HTTP


def split_url(url: str, what: str) -> SplitResult:
    """The parts of an http(s) URL, or Fatal naming the option."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Fatal(f"{what} must be an http:// or https:// URL, not {shown_url(url)!r}")
    return parts


def shown_url(url: str) -> str:
    """The URL without any user:password part, for messages."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def connection(parts: SplitResult, timeout: float) -> http.client.HTTPConnection:
    """An unopened connection to the URL's host; `timeout` bounds the connect and each read."""
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return cls(parts.hostname or "", parts.port, timeout=timeout)


def stream_target(options: Options) -> str:
    """The request target of the channel's stream, raw (for --forward) or not."""
    base = urlsplit(options.url).path.rstrip("/")
    return f"{base}/events/{quote(options.channel, safe='')}" + ("?raw=1" if options.forward else "")


def open_stream(options: Options, cursor: str | None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Connect and subscribe; Retry for what may pass, Fatal for what cannot."""
    conn = connection(split_url(options.url, "--url"), options.idle_timeout)
    headers = {"Authorization": f"Bearer {options.token}", "Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if cursor is not None:
        headers["Last-Event-ID"] = cursor
    try:
        conn.request("GET", stream_target(options), headers=headers)
        response = conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise Retry(f"cannot connect to {shown_url(options.url)} ({exc or type(exc).__name__})") from None
    if response.status == 200 and response.getheader("Content-Type", "").startswith("text/event-stream"):
        return conn, response
    try:
        refusal(response)
    finally:
        conn.close()


def refusal(response: http.client.HTTPResponse) -> NoReturn:
    """Raise Fatal or Retry for an answer that is not an event stream."""
    try:
        body = response.read(65536)
    except (OSError, http.client.HTTPException):
        body = b""
    status, message = response.status, error_message(body)
    if status == 200:
        raise Fatal(f"{response.getheader('Content-Type')!r} is not an event stream: is --url the webhook server?")
    detail = f"{status}: {message or FATAL_STATUSES.get(status, response.reason)}"
    if status in FATAL_STATUSES or (400 <= status < 500 and status not in (408, 429)):
        raise Fatal(f"the server answered {detail}")
    raise Retry(f"the server answered {detail}", retry_after(response.getheader("Retry-After")))


def error_message(body: bytes) -> str:
    """The `message` (or `error`) of a JSON error body, else ''."""
    try:
        document = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(document, dict):
        return ""
    return printable(str(document.get("message") or document.get("error") or ""))


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (the delta-seconds form), else None."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def server_time(response: http.client.HTTPResponse) -> datetime:
    """The server's clock at connect (its Date header), else ours."""
    try:
        return parsedate_to_datetime(response.getheader("Date", "")).astimezone(UTC)
    except (TypeError, ValueError):
        return datetime.now(UTC)


def lines(response: http.client.HTTPResponse, idle_timeout: float) -> Iterator[str]:
    """The stream's lines until the server closes it; Retry when it breaks or stays silent."""
    while True:
        try:
            raw = response.readline()
        except TimeoutError:
            raise Retry(f"nothing from the server for {idle_timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise Retry(f"connection lost ({exc or type(exc).__name__})") from None
        if not raw:
            return
        yield raw.decode("utf-8", "replace")


def forward_request(event: dict[str, Any]) -> tuple[bytes, list[tuple[str, str]]]:
    """The body and headers to re-send: the received bytes, content type and kept sender headers."""
    if "body_base64" in event:
        body = base64.b64decode(event["body_base64"], validate=True)
        content_type = str(event.get("content_type") or "application/octet-stream")
    else:  # no raw body from the server: the parsed payload is the best there is
        body, content_type = json.dumps(event.get("payload")).encode(), "application/json"
    headers = [("Content-Type", content_type)]
    for name, value in event.get("headers") or []:
        if str(name).lower() not in SKIPPED_HEADERS and not any(c in f"{name}{value}" for c in "\r\n\0"):
            headers.append((str(name), str(value)))
    headers.append(("X-Webhook-Event-Id", str(event["id"])))
    return body, headers


def post(url: str, body: bytes, headers: list[tuple[str, str]], timeout: float = FORWARD_TIMEOUT) -> int:
    """POST to the local app with exactly these headers (in order); its status code."""
    parts = split_url(url, "--forward")
    conn = connection(parts, timeout)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.putrequest("POST", target, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


# ----------------------------------------------------------------------------- output


def printable(text: str) -> str:
    """The text with control characters replaced, so a sender cannot drive the terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)


def format_event(event: dict[str, Any]) -> str:
    """One readable line: time, id, source/event, device and the start of the payload."""
    payload = json.dumps(event.get("payload"), separators=(",", ":"), ensure_ascii=False)
    if len(payload) > PAYLOAD_WIDTH:
        payload = payload[: PAYLOAD_WIDTH - 3] + "..."
    fields = (event.get("received_at", "?"), event.get("id"), f"{event.get('source')}/{event.get('event')}")
    return printable("  ".join(map(str, (*fields, event.get("device") or "-", payload))))


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time (UTC when it names no zone), else None."""
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass
class Catchup:
    """Counts the missed events a resumed connection sends before the live tail begins."""

    resuming: bool
    server_now: datetime
    opened: float = field(default_factory=time.monotonic)
    count: int = 0
    done: bool = False
    marked: bool = False  # the server says where the backlog ends (": connected" ... ": live")

    def comment(self, text: str) -> bool:
        """Note a comment line; True when it ends the catch-up (webhook-server's `: live` marker)."""
        if text == ": connected":
            self.marked = True
            return False
        if text == ": live" and self.marked:
            ended = self.resuming and not self.done
            self.done = True
            return ended
        return False if self.marked else self.heartbeat()

    def event(self, received_at: Any) -> bool:
        """Note one event; True when it is the first live one (the catch-up just ended)."""
        if self.done or not self.resuming:
            return False
        if self.marked:  # every event before the marker is a missed one
            self.count += 1
            return False
        moment = parse_time(received_at)
        if moment is not None and moment < self.server_now:
            self.count += 1
            return False
        self.done = True
        return True

    def heartbeat(self) -> bool:
        """Note a heartbeat: the backlog was sent (an early greeting comment does not count)."""
        if self.done or not self.resuming or (self.count == 0 and time.monotonic() - self.opened < 1.0):
            return False
        self.done = True
        return True


# ----------------------------------------------------------------------------- the client


class Listener:
    """Follows one channel: connects, handles each event, saves the position, reconnects."""

    def __init__(
        self,
        options: Options,
        out: IO[str] | None = None,
        err: IO[str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.options = options
        self.state = options.state or default_state_path(options.url, options.channel, options.forward)
        self.out, self.err, self.sleep = out or sys.stdout, err or sys.stderr, sleep
        self.backoff, self.forward_backoff = Backoff(), Backoff()
        self.connections = 0
        self.signals = StopSignals()
        split_url(options.url, "--url")
        if options.forward:
            split_url(options.forward, "--forward")
        self.cursor = load_cursor(self.state)

    def say(self, text: str) -> None:
        """A status line on stderr."""
        print(f"webhook-server listen: {text}", file=self.err, flush=True)

    def run(self) -> None:
        """Follow the stream until interrupted; Fatal for what retrying cannot fix."""
        self.say(f"position kept in {self.state}")
        while True:
            try:
                self.session()
            except Retry as exc:
                delay = self.backoff.next(exc.delay or 0.0)
                self.say(f"{exc}; reconnecting in {delay:.1f} s")
                self.sleep(delay)

    def session(self) -> None:
        """One connection: returns when the server asks for an immediate reconnect, else Retry."""
        conn, response = open_stream(self.options, self.cursor)
        try:
            self.connections += 1
            verb = "connected to" if self.connections == 1 else "reconnected to"
            resume = f", resuming after event {self.cursor}" if self.cursor is not None else ""
            self.say(f"{verb} {shown_url(self.options.url)} channel {self.options.channel}{resume}")
            catchup = Catchup(self.cursor is not None, server_time(response))
            self.consume(lines(response, self.options.idle_timeout), catchup)
        finally:
            conn.close()

    def consume(self, stream: Iterator[str], catchup: Catchup) -> None:
        """Handle the stream's messages; returns on overflow, Retry when the stream ends."""
        parser = SSEParser()
        for line in stream:
            self.backoff.reset()
            if line.startswith(":"):
                self.caught_up(catchup.comment(line.strip()), catchup)
                continue
            message = parser.feed(line)
            if message is None:
                continue
            if message.event == "overflow":
                self.say("the server dropped this connection (events came faster than they were handled)")
                return
            if message.event == "reset":
                self.reset(message)
            elif message.event == "message":
                self.message(message, catchup)
        raise Retry("the server closed the stream")

    def caught_up(self, ended: bool, catchup: Catchup) -> None:
        """Say how many missed events were caught up, once the live tail begins."""
        if ended:
            self.say(f"caught up {catchup.count} missed event(s); now live")

    def reset(self, message: Message) -> None:
        """The position was unknown to the server: say that events were missed."""
        try:
            oldest = json.loads(message.data).get("oldest")
        except (ValueError, AttributeError):
            oldest = None
        self.say(
            f"the server no longer has the events after {self.cursor} (or never had that id): events were missed;"
            f" going on from its oldest kept event {printable(str(oldest))}"
        )

    def message(self, message: Message, catchup: Catchup) -> None:
        """Handle one event, then save its id as the position."""
        try:
            event = json.loads(message.data)
            event_id = str(event.get("id") if event.get("id") is not None else message.id)
        except (ValueError, AttributeError):
            self.say(f"skipping an unreadable event (id {message.id}): not a JSON object")
            return
        self.caught_up(catchup.event(event.get("received_at")), catchup)
        status = self.forward(event, event_id) if self.options.forward else None
        with self.signals.held():
            self.emit(event, status)
            self.cursor = event_id
            save_cursor(self.state, self.options, event_id)

    def emit(self, event: dict[str, Any], status: int | None) -> None:
        """Print the event: a readable line, or its JSON object with --json."""
        line = json.dumps(event) if self.options.json_output else format_event(event)
        if status is not None and not self.options.json_output:
            line += f"  -> {status}"
        print(line, file=self.out, flush=True)

    def forward(self, event: dict[str, Any], event_id: str) -> int:
        """POST the event to the local app until it answers 2xx; its status."""
        assert self.options.forward is not None
        try:
            body, headers = forward_request({**event, "id": event_id})
        except (binascii.Error, ValueError, TypeError) as exc:
            raise Fatal(f"event {event_id}: the server sent an unreadable raw body ({exc})") from None
        while True:
            try:
                status = post(self.options.forward, body, headers)
            except (OSError, http.client.HTTPException) as exc:
                problem = f"cannot reach {shown_url(self.options.forward)} ({exc or type(exc).__name__})"
            else:
                if 200 <= status < 300:
                    self.forward_backoff.reset()
                    return status
                problem = f"{shown_url(self.options.forward)} answered {status}"
            delay = self.forward_backoff.next()
            self.say(f"event {event_id} not handled: {problem}; trying it again in {delay:.1f} s")
            self.sleep(delay)


def main(options: Options) -> int:
    """Run `listen`; the exit status (2 for what retrying cannot fix, 130 on Ctrl-C, 143 on SIGTERM)."""
    try:
        listener = Listener(options)
        listener.signals.install()
        listener.run()
    except Fatal as exc:
        print(f"webhook-server listen: {exc}", file=sys.stderr, flush=True)
        return 2
    except Stopped as exc:
        return 128 + exc.signum
    return 0  # pragma: no cover - run() only returns by an exception
