"""JSON log lines written in batches from a background thread, and Gunicorn without its access log."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _pytest.logging import LogCaptureHandler

from webhook_server.ops.gunicorn_logging import GunicornNoAccessLogger
from webhook_server.ops.logs import BatchingStreamHandler, JsonFormatter


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger(f"test.batching.{time.monotonic_ns()}")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


class RecordingStream(io.StringIO):
    """A text stream that keeps each write, to see how lines were grouped."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = []

    def write(self, text: str) -> int:
        self.chunks.append(text)
        return super().write(text)


def _handler(stream: io.StringIO | io.TextIOWrapper) -> BatchingStreamHandler:
    handler = BatchingStreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    return handler


def _messages(text: str) -> list[str]:
    return [json.loads(line)["message"] for line in text.splitlines()]


def _wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)


def test_lines_reach_the_stream_soon_in_order(logger: logging.Logger) -> None:
    stream = io.StringIO()
    logger.addHandler(_handler(stream))
    for n in range(200):
        logger.info("line %d", n, extra={"n": n})
    _wait_for(lambda: stream.getvalue().count("\n") == 200)
    assert _messages(stream.getvalue()) == [f"line {n}" for n in range(200)]
    assert json.loads(stream.getvalue().splitlines()[7])["n"] == 7


def test_lines_are_not_written_one_by_one(logger: logging.Logger) -> None:
    stream = RecordingStream()
    logger.addHandler(_handler(stream))
    for n in range(100):
        logger.info("line %d", n)
    _wait_for(lambda: stream.getvalue().count("\n") == 100)
    # A few batches (more on a slow machine), each of a few PIPE_BUF-sized writes: far fewer
    # writes than lines.
    assert len(stream.chunks) <= 25


def test_an_error_is_written_before_the_call_returns_with_the_lines_before_it(logger: logging.Logger) -> None:
    stream = io.StringIO()
    logger.addHandler(_handler(stream))
    logger.info("before")
    logger.error("broken")
    assert _messages(stream.getvalue()) == ["before", "broken"]


def test_close_writes_what_is_left(logger: logging.Logger) -> None:
    stream = io.StringIO()
    handler = _handler(stream)
    logger.addHandler(handler)
    for n in range(5):
        logger.warning("w%d", n)
    handler.close()
    assert _messages(stream.getvalue()) == [f"w{n}" for n in range(5)]


class BreakableStream(RecordingStream):
    """Writes fail like a closed pipe's while `broken` is set."""

    broken = False

    def write(self, text: str) -> int:
        if self.broken:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_closed_stream_is_not_an_error(logger: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    handler = _handler(stream)
    logger.addHandler(handler)
    logger.error("before")
    assert _messages(stream.getvalue()) == ["before"]
    stream.close()
    logger.error("nowhere to go")  # written at once, on this thread: an error would surface here
    logger.info("nor this")
    handler.flush()  # what the writer thread does with it, here where an error would surface
    handler.close()
    assert handler._lines == []  # dropped, not kept waiting forever
    # Not reported either: logging's handleError would print "--- Logging error ---" to stderr.
    assert capsys.readouterr().err == ""


def test_a_failed_write_loses_only_its_own_lines(logger: logging.Logger) -> None:
    stream = BreakableStream()
    logger.addHandler(_handler(stream))
    logger.error("before")
    stream.broken = True
    logger.error("lost")  # the write fails: the line is dropped, nothing raised
    stream.broken = False
    logger.error("after")
    assert _messages(stream.getvalue()) == ["before", "after"]


def test_a_forked_child_logs_through_its_own_writer(logger: logging.Logger, tmp_path: Path) -> None:
    out = tmp_path / "log.jsonl"
    with open(out, "w", encoding="utf-8") as stream:
        handler = _handler(stream)
        logger.addHandler(handler)
        logger.info("parent before")
        pid = os.fork()
        if pid == 0:  # the child: its writer thread did not survive the fork
            try:
                logger.info("child")
                _wait_for(lambda: False, timeout=0.3)
                handler.flush()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        logger.info("parent after")
        handler.close()
    assert sorted(_messages(out.read_text(encoding="utf-8"))) == ["child", "parent after", "parent before"]


def test_gunicorn_builds_no_access_log_line() -> None:
    from gunicorn.config import Config

    config = Config()
    config.set("logconfig_dict", {"version": 1, "disable_existing_loggers": False})
    log = GunicornNoAccessLogger(config)
    # Gunicorn's own Logger turns access logging on whenever a logging config is given.
    assert log.access_log_enabled is False


def test_each_write_is_whole_lines_within_pipe_buf(logger: logging.Logger) -> None:
    stream = RecordingStream()
    handler = _handler(stream)
    logger.addHandler(handler)
    for n in range(300):
        logger.info("line %d %s", n, "é" * (n % 50))
    handler.close()
    assert len(stream.chunks) > 1
    for chunk in stream.chunks:
        assert chunk.endswith("\n") and len(chunk.encode()) <= BatchingStreamHandler.WRITE_BYTES
        for line in chunk.splitlines():
            json.loads(line)
    assert len(_messages(stream.getvalue())) == 300


def test_a_line_that_cannot_be_encoded_spoils_no_other(logger: logging.Logger, tmp_path: Path) -> None:
    # pytest captures the logs of loggers that do not propagate too; its copy of the lone
    # surrogate would make the report one that pytest-xdist cannot send between processes.
    for capturing in [h for h in logger.handlers if isinstance(h, LogCaptureHandler)]:
        logger.removeHandler(capturing)
    out = tmp_path / "log.jsonl"
    with open(out, "w", encoding="utf-8") as stream:
        handler = _handler(stream)
        logger.addHandler(handler)
        logger.info("before")
        logger.info("lone surrogate \ud800 here")
        logger.info("after")
        handler.close()
    assert _messages(out.read_text(encoding="utf-8")) == ["before", "lone surrogate ? here", "after"]


def test_lines_after_close_are_still_written(logger: logging.Logger) -> None:
    stream = io.StringIO()
    handler = _handler(stream)
    logger.addHandler(handler)
    handler.close()
    logger.info("late")
    assert _messages(stream.getvalue()) == ["late"]


def test_a_flood_of_lines_is_written_by_the_logging_threads_themselves(logger: logging.Logger) -> None:
    stream = io.StringIO()
    handler = _handler(stream)
    handler.MAX_WAITING = 10  # type: ignore[misc]
    logger.addHandler(handler)
    for n in range(25):
        logger.info("n%d", n)
    # Without a writer having run, at most MAX_WAITING lines are left waiting.
    assert stream.getvalue().count("\n") >= 15
