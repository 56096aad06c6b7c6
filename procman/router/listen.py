"""The public listener: bound before anything starts, and never opened up without a key.

The public port (the one users point clients at) is bound by llamactl itself
and the bound socket is handed to the router, so there is no window between
"checked free" and "listening" in which another program could take it, and a
busy port is reported before any llama-server is spawned.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from procman.errors import ConfigError, PortInUseError

__all__ = ["bind_listener", "check_exposure", "is_loopback"]


def bind_listener(host: str, port: int, *, backlog: int = 128) -> socket.socket:
    """A listening TCP socket on ``host:port``, or :class:`PortInUseError`.

    SO_REUSEADDR is set (as every server does) so a port in TIME_WAIT after a
    restart is reusable, while a port another program listens on is not.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host!r}: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno in {errno.EADDRINUSE, errno.EACCES}:
            if exc.errno == errno.EACCES:
                raise ConfigError(
                    f"not allowed to listen on {host}:{port}",
                    hint="ports below 1024 need privileges; pass a higher --port",
                ) from exc
            raise PortInUseError(host, port) from exc
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


def is_loopback(host: str) -> bool:
    """Whether ``host`` only reaches this machine (every address it resolves to is loopback).

    A name that does not resolve counts as not loopback: exposing the server
    by accident is worse than asking for ``--api-key``.
    """
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0])).is_loopback for info in infos)


def check_exposure(host: str, api_key: str | None, *, allow_unauthenticated: bool = False) -> None:
    """Refuse to listen beyond this machine without an API key, unless told to."""
    if api_key or allow_unauthenticated or is_loopback(host):
        return
    raise ConfigError(
        f"refusing to serve on {host} without an API key: anyone who can reach it could use it",
        hint="pass --api-key KEY (or set LLAMACTL_API_KEY), or --insecure to serve without one",
    )
