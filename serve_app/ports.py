"""Local TCP ports: whether one is free to bind, and a free one to listen on (tests, benchmarks)."""

from __future__ import annotations

import socket


def port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel has just handed out on `host`, free for a server to bind."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
