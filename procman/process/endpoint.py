"""Where one private llama-server listens, and what a client must send to reach it.

llama-server has no notion of who may call it beyond one API key. So a
managed server listens either

* on a **Unix socket** in :func:`procman.process._sockets.private_dir` (mode 0700):
  only this user can connect, and only the router (or the library that owns
  the server) knows the path; this is what ``serve`` uses, or
* on a **loopback TCP port**, where any local user could connect, with a
  random **per-server key** that llama-server reads from a 0600 key file
  (``--api-key-file``, never argv) and that only its owner is told: for the
  library and the daemon, whose clients talk to the server themselves.

A private port must be chosen by us and then bound by llama-server, so a race
is unavoidable: the kernel's choice for port 0 is free at that instant, and
if another program grabs it before llama-server binds, llama-server exits
early saying so (:func:`is_bind_failure`) and the supervisor retries with a
fresh port. Ephemeral ports are handed out round-robin, so a collision twice
in a row is very unlikely. A socket's name is random, and one left by a dead
server is removed before the spawn.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from procman.process._sockets import new_socket_path, pick_free_port, private_dir

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Coroutine

    import aiohttp

__all__ = ["BIND_FAILURE_MARKERS", "Endpoint", "Listen", "is_bind_failure"]

#: how a private server listens: a socket file only this user can reach, or a keyed TCP port
Listen = Literal["unix", "tcp"]
#: what llama-server logs when it cannot listen (b11312: "couldn't bind HTTP server socket")
BIND_FAILURE_MARKERS = ("couldn't bind HTTP server socket", "Address already in use")


def is_bind_failure(log_text: str) -> bool:
    """Whether llama-server's output says it could not bind its port."""
    return any(marker in log_text for marker in BIND_FAILURE_MARKERS)


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """One life's address of a private llama-server."""

    socket: str | None = None
    """The Unix socket's path (llama-server takes a host ending in ``.sock`` as one)."""
    host: str = "127.0.0.1"
    port: int | None = None
    api_key: str | None = field(default=None, repr=False)
    """The per-server key (TCP only), sent as ``Authorization: Bearer``."""
    key_file: str | None = None
    """Where llama-server reads ``api_key`` from (0600)."""

    @classmethod
    def unix(cls, name: str) -> Endpoint:
        return cls(socket=new_socket_path(name))

    @classmethod
    def tcp(cls, name: str, host: str = "127.0.0.1", port: int | None = None) -> Endpoint:
        """A loopback port (free now, unless given) and a fresh key in a 0600 file."""
        import secrets  # speed: ~2 ms, for TCP servers only

        key = secrets.token_urlsafe(24)
        key_file = os.path.join(private_dir(), f"{name[:24]}-{secrets.token_hex(4)}.key")  # noqa: PTH118 - a str path, as llama-server's argv takes it
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        chosen = port if port is not None else pick_free_port(host)
        return cls(host=host, port=chosen, api_key=key, key_file=key_file)

    @property
    def url(self) -> str:
        """The root URL an HTTP client asks for (through :attr:`socket` when there is one)."""
        if self.socket is not None:
            return "http://localhost"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def address(self) -> str:
        """For people: the socket path or ``host:port``."""
        return self.socket if self.socket is not None else f"{self.host}:{self.port}"

    @property
    def pool_key(self) -> tuple[str, int]:
        return (self.socket, 0) if self.socket is not None else (self.host, self.port or 0)

    def argv(self) -> list[str]:
        """llama-server's arguments for listening here."""
        if self.socket is not None:
            return ["--host", self.socket]
        argv = ["--host", self.host, "--port", str(self.port)]
        return argv + (["--api-key-file", self.key_file] if self.key_file else [])

    def auth(self) -> list[tuple[str, str]]:
        """The header that authorises a request to this server (none on a socket)."""
        return [("Authorization", f"Bearer {self.api_key}")] if self.api_key else []

    def connect(
        self, factory: Callable[[], asyncio.Protocol]
    ) -> Coroutine[Any, Any, tuple[asyncio.BaseTransport, asyncio.Protocol]]:
        """Open a connection to the server (awaitable; wrap it in a timeout)."""
        import asyncio  # speed: spec imports this module, and `serve` that before any loop

        loop = asyncio.get_running_loop()
        if self.socket is not None:
            return loop.create_unix_connection(factory, self.socket)
        return loop.create_connection(factory, self.host, self.port or 0)

    def connector(self, *, force_close: bool = False) -> aiohttp.BaseConnector:
        """An aiohttp connector that reaches this server."""
        import aiohttp  # speed

        if self.socket is not None:
            return aiohttp.UnixConnector(self.socket, force_close=force_close)
        return aiohttp.TCPConnector(force_close=force_close)

    def prepare(self) -> None:
        """Before a spawn: a socket file left by a dead server would make the bind fail."""
        if self.socket is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket)  # noqa: PTH108 - a str path

    def remove(self) -> None:
        """After the server is gone: its socket file and key file."""
        for path in (self.socket, self.key_file):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # noqa: PTH108 - a str path
