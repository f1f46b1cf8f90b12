"""Waking every process's hub on this host when an event is stored: a datagram to each one.

Each process with subscribers binds a Unix datagram socket in `DATA_DIR/live/`; the process
that stored an event sends one byte to every socket there after its commit. A datagram costs a
few microseconds and reaches the other Gunicorn workers at once, where polling the store would
cost a query per subscriber or a delay per event. A lost or refused datagram loses nothing: the
hubs also look at the store once a second, and the events are in the store either way.

With REDIS_URL the doorbell reaches other hosts too (`redis_bell`): a ring also publishes to
Redis, and a listening process rings its own socket on each message from there.
"""

from __future__ import annotations

import os
import socket
from contextlib import suppress
from pathlib import Path

from webhook_server.live.redis_bell import RedisBell
from webhook_server.store.sqlite import make_private_dir

SOCKET_SUFFIX = ".sock"


class Doorbell:
    """The ringing side (any process that stores events) and, once `listen` ran, the listening side."""

    def __init__(self, directory: Path, fanout: RedisBell | None = None) -> None:
        self.directory = directory
        self.fanout = fanout  # other hosts' processes, through Redis
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)
        self.path: Path | None = None

    def listen(self) -> socket.socket:
        """This process's socket, bound in the directory; remove it with `close`."""
        make_private_dir(self.directory)
        self.path = self.directory / f"{socket.gethostname()[:40]}-{os.getpid()}{SOCKET_SUFFIX}"
        with suppress(FileNotFoundError):
            self.path.unlink()  # a process of the same pid before a restart
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(str(self.path))
        if self.fanout is not None:
            self.fanout.listen(self.wake)
        return receiver

    def ring(self, event_id: int | str | None = None) -> None:
        """Wake every listening process (this one too). Never raises: the hubs poll as well."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            names = []  # no directory: nobody listens here yet
        for name in names:
            if name.endswith(SOCKET_SUFFIX):
                self._ring_one(str(self.directory / name))
        if self.fanout is not None:
            self.fanout.publish("" if event_id is None else str(event_id))

    def wake(self) -> None:
        """Ring this process's own socket only (what Redis says reaches the hub this way)."""
        if self.path is not None:
            self._ring_one(str(self.path))

    def _ring_one(self, path: str) -> None:
        try:
            self._sender.sendto(b"!", path)
        except BlockingIOError:
            pass  # its queue is full: it has a wake-up waiting already
        except (ConnectionRefusedError, FileNotFoundError):
            with suppress(OSError):
                os.unlink(path)  # a process that is gone
        except OSError:
            pass

    def close(self) -> None:
        if self.path is not None:
            with suppress(OSError):
                self.path.unlink()
