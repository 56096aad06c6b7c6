"""Free loopback ports, with nothing imported but ``socket``.

Used where a program we start must bind a port we choose (a verification run,
a private llama-server): the kernel's pick for port 0 is free at that instant,
and the caller retries if another program takes it first. ``llamactl serve``'s
early start uses it before anything heavy is imported.
"""

from __future__ import annotations

import socket

__all__ = ["can_bind", "pick_free_port"]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that was free a moment ago (the kernel's pick for port 0)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def can_bind(host: str, port: int) -> bool:
    """Whether ``host:port`` could be bound now, as a listener would (SO_REUSEADDR)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
