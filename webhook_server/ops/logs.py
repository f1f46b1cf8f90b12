"""Logs: one JSON object per line on stderr/stdout, never a secret or a whole payload."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else was passed with `extra=` and is logged as a field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", ...extra fields}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class BatchingStreamHandler(logging.Handler):
    """Lines to a stream from a background thread, a few writes per batch.

    A write and flush per line on the request thread (a system call, with the GIL handed to
    another thread and back) cost about 120 us of CPU per request under load here; the line
    is now formatted on the request thread and written with whatever else is waiting. Lines
    reach the stream within BATCH_SECONDS. ERROR and above are written at once (with any
    lines before them), and `flush` (run by logging at exit) writes the rest.

    Each write holds whole lines and at most PIPE_BUF bytes: the processes of `serve` share
    one stdout pipe, and only writes that small are never split by another process's.
    """

    BATCH_SECONDS = 0.05
    WRITE_BYTES = 4096  # PIPE_BUF on Linux
    MAX_WAITING = 10_000  # lines; past that, the logging thread writes them itself

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self.stream = stream
        self._lines: list[str] = []
        self._cond = threading.Condition(threading.Lock())
        self._writer_pid: int | None = None
        self._write_lock = threading.Lock()  # not self.lock, which emit() runs under
        self._closed = False
        _batching_handlers.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        with self._cond:
            self._lines.append(line)
            waiting = len(self._lines)
            if waiting == 1:
                self._cond.notify()
        # Errors at once; a stream that cannot keep up holds the logging threads back, as an
        # unbatched handler would, rather than filling memory; after close, nothing waits.
        if record.levelno >= logging.ERROR or waiting > self.MAX_WAITING or self._closed:
            self.flush()
        elif self._writer_pid != os.getpid():  # none yet, or it stayed in the parent at a fork
            self._start_writer()

    def flush(self) -> None:
        with self._write_lock:  # one writer at a time, so lines stay in order
            with self._cond:
                lines, self._lines = self._lines, []
            for chunk in _chunks(lines, self.WRITE_BYTES):
                try:
                    self._write(chunk)
                except UnicodeEncodeError:  # a lone surrogate, or a stream that is not UTF-8
                    encoding = getattr(self.stream, "encoding", None) or "utf-8"
                    self._write(chunk.encode(encoding, "replace").decode(encoding))

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except UnicodeEncodeError:
            raise
        except (OSError, ValueError):  # a closed pipe or stream: nowhere left to log
            pass

    def _start_writer(self) -> None:
        with self._cond:
            if self._writer_pid == os.getpid():
                return
            self._writer_pid = os.getpid()
        threading.Thread(target=self._run, name="log-writer", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._lines and not self._closed:
                    self._cond.wait()
            # Let the lines of other requests gather: under load the writer then wakes about
            # 1/BATCH_SECONDS times a second, not once a request (each wake a context switch).
            time.sleep(self.BATCH_SECONDS)
            self.flush()
            if self._closed:
                return

    def close(self) -> None:
        """Write what is left; the writer thread ends."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self.flush()
        super().close()

    def _after_fork_in_child(self) -> None:
        # Another thread of the parent may have held a lock at the fork; the child has only
        # this thread, and no writer until the next line starts one. The lines waiting at the
        # fork are the parent's to write.
        self._lines = []
        self._cond = threading.Condition(threading.Lock())
        self._write_lock = threading.Lock()


def _chunks(lines: list[str], limit: int) -> Iterator[str]:
    """The lines joined into texts of whole lines, each at most `limit` bytes where one fits."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        length = (len(line) if line.isascii() else len(line.encode("utf-8", "surrogatepass"))) + 1
        if chunk and size + length > limit:
            yield "\n".join(chunk) + "\n"
            chunk, size = [], 0
        chunk.append(line)
        size += length
    if chunk:
        yield "\n".join(chunk) + "\n"


_batching_handlers: weakref.WeakSet[BatchingStreamHandler] = weakref.WeakSet()


def _reinit_after_fork() -> None:
    for handler in list(_batching_handlers):
        handler._after_fork_in_child()


os.register_at_fork(after_in_child=_reinit_after_fork)


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    """Send the root logger's records to stdout as JSON lines (idempotent; other handlers stay)."""
    # Our lines carry no caller file and line: skip walking the stack for them on every
    # record (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_webhook_server", False)]:
        root.removeHandler(old)
        old.close()
    handler = BatchingStreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    handler._webhook_server = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # urllib3 (forwarding) logs each request's URL at DEBUG, and a URL may carry a token: it
    # says nothing below ERROR, whatever LOG_LEVEL is. Outcomes are logged by target name.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
