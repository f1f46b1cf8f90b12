"""Is a TCP port free to listen on? Checked before Gunicorn starts.

Gunicorn's workers bind with SO_REUSEPORT (one listening socket each, so the kernel spreads
connections over them). With that option a second server of the same user binds the same
port without an error and the kernel splits requests between two servers, and a port held by
another program makes each worker fail to bind and be restarted forever. So `serve`, `web` and
Gunicorn's `on_starting` hook first bind the address themselves without SO_REUSEPORT: that
fails when anything at all listens there.
"""

from __future__ import annotations

import errno
import socket


class PortInUse(Exception):
    """Something already listens on the address; the message names it."""


def check_free(host: str, port: int) -> None:
    """Raise `PortInUse` when `host:port` cannot be listened on by a new server."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # SO_REUSEADDR, as servers set it: a connection in TIME_WAIT is no obstacle,
            # but a listening socket still is (Linux refuses that bind).
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(f"port {port} on {host} is already in use by another program or server") from None
                raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror}") from None
