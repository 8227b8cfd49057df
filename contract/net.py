"""Small network helpers shared by every component (no heavy imports)."""

from __future__ import annotations

import errno
import socket


class PortError(ValueError):
    """A port that cannot be listened on; the message is one actionable line."""


def check_port_free(host: str, port: int) -> None:
    """Bind and release the port now, so a clash fails in a second rather than after model load."""
    if not 0 < port < 65536:
        raise PortError(f"--port {port} is out of range 1..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortError(f"port {port} on {host} is already in use: stop what holds it or pass --port") from exc
            raise PortError(f"cannot listen on {host}:{port} ({exc.strerror})") from exc
