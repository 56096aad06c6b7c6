"""The shared daemon: one supervisor for many client processes, behind a Unix socket.

Files, in ``<llamactl home>/daemon/`` (mode 0700)::

    daemon.sock   the socket (0600): JSON lines, see below
    daemon.lock   flock'ed by the living daemon for its whole life
    spawn.lock    flock'ed by a client while it checks for a daemon and starts one
    daemon.pid    informative only
    daemon.log    the daemon's own stdout/stderr
    http.json     with ``--http``: the router's URL and key (0600; see procman.daemon._http)

Liveness is the flock on ``daemon.lock``, never the existence of a file:
after a crash (even SIGKILL) the kernel releases the lock, and the next
daemon removes the stale socket and pid file. Two clients starting a daemon
at once serialise on ``spawn.lock``, so exactly one daemon is launched; a
daemon started by hand that loses the race on ``daemon.lock`` exits at once.

Protocol: one JSON object per line each way; each request gets one reply, in
order, on the same connection::

    -> {"op": "serve", "model": "demo", "ctx": 2048}      (ServeRequest fields)
    <- {"ok": true, "data": {"name": "demo", "state": "ready", "url": ...}}
    -> {"op": "status"}
    <- {"ok": true, "data": {"pid": 123, "servers": [...], "clients": 2}}
    -> {"op": "remove", "name": "demo"}
    <- {"ok": true, "data": null}
    -> {"op": "stop"}                                       (the daemon exits)
    <- {"ok": true, "data": null}
    <- {"ok": false, "error": {"type": "ModelError", "message": ..., "hint": ...,
                               "retry": false}}

``retry: true`` means "this daemon is shutting down": connect again (a new
daemon is started) and repeat the request.

Life: the daemon exits after ``idle_timeout`` seconds with no client
connected and no request; a connected client counts as activity, so the
servers it asked for stay up while it is attached. Shutdown goes: refuse
new requests -> close the listener -> unlink the socket -> stop the servers
-> release the lock, so a client never connects to a daemon that will not
answer, and never finds the lock free while servers of the old daemon run.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from procman._units import duration_option
from procman.errors import ConfigError, DaemonError, LlamactlError

__all__ = ["Daemon", "DaemonPaths", "run_daemon"]

log = logging.getLogger(__name__)

#: default seconds without clients or requests after which the daemon exits
DEFAULT_IDLE_TIMEOUT = 300.0
_MAX_LINE = 1 << 20
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


@dataclass(frozen=True)
class DaemonPaths:
    """Where one daemon's files live; ``socket`` may be elsewhere (``--socket``)."""

    root: Path
    socket: Path

    @classmethod
    def default(cls, socket_path: Path | None = None, home: Path | None = None) -> DaemonPaths:
        if home is None:
            from buildtools.paths import home as llamactl_home  # speed

            home = llamactl_home()
        root = home / "daemon"
        return cls(root=root, socket=socket_path or root / "daemon.sock")

    @property
    def lock(self) -> Path:
        return self.root / "daemon.lock"

    @property
    def spawn_lock(self) -> Path:
        return self.root / "spawn.lock"

    @property
    def pid_file(self) -> Path:
        return self.root / "daemon.pid"

    @property
    def log(self) -> Path:
        return self.root / "daemon.log"

    @property
    def http_info(self) -> Path:
        return self.root / "http.json"

    def prepare(self) -> None:
        """Create the folder owner-only (and tighten one that exists)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root.chmod(0o700)
        if len(os.fsencode(self.socket)) > _SOCKET_PATH_MAX:
            raise ConfigError(
                f"socket path too long for a Unix socket: {self.socket}",
                hint="pass a shorter --socket, or a shorter LLAMACTL_HOME",
            )


def open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def daemon_alive(paths: DaemonPaths) -> bool:
    """Whether a daemon holds the lock (it may still be starting or already stopping)."""
    if not paths.lock.exists():
        return False
    fd = open_lock(paths.lock)
    try:
        return not try_lock(fd)
    finally:
        os.close(fd)  # releases the probe's lock, if it got it


class _ShuttingDown(DaemonError):
    """Sent with ``retry: true``: the client reconnects to a new daemon and asks again."""


def _error_reply(exc: BaseException, *, retry: bool = False) -> dict[str, Any]:
    message = exc.message if isinstance(exc, LlamactlError) else str(exc)
    hint = exc.hint if isinstance(exc, LlamactlError) else None
    error: dict[str, Any] = {
        "type": type(exc).__name__,
        "message": message,
        "hint": hint,
        "retry": retry,
    }
    if tail := getattr(exc, "log_tail", ""):
        error["log_tail"] = tail
    return {"ok": False, "error": error}


class Daemon:
    """The daemon's state: its supervisor, its listener, its clients, its idle clock."""

    def __init__(
        self,
        paths: DaemonPaths,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        http_port: int | None = None,
    ) -> None:
        """``http_port``: also serve the router there, on 127.0.0.1 (0: any free port)."""
        from procman.daemon._http import DaemonHttp  # speed
        from procman.supervisor import AsyncSupervisor  # speed

        self.paths = paths
        self.idle_timeout = idle_timeout
        self.supervisor = AsyncSupervisor()
        self.http = (
            DaemonHttp(self.supervisor, paths.http_info, http_port)
            if http_port is not None
            else None
        )
        self._clients = 0
        self._busy = 0
        self._last_activity = time.monotonic()
        self._activity = asyncio.Event()
        self._stop = asyncio.Event()
        self._shutting_down = False
        self._server: asyncio.Server | None = None
        self.listening = asyncio.Event()
        """Set once the socket accepts connections."""

    # -- life -------------------------------------------------------------------------------
    async def run(self, lock_fd: int, ready: IO[bytes] | None = None) -> None:
        """Serve until idle or stopped; ``lock_fd`` is held (flock) by the caller."""
        loop = asyncio.get_running_loop()
        listener = self._bind()
        self._server = await asyncio.start_unix_server(self._handle, sock=listener, limit=_MAX_LINE)
        if self.http is not None:
            try:
                url = await self.http.start()
            except BaseException:
                self._server.close()
                with contextlib.suppress(FileNotFoundError):
                    self.paths.socket.unlink()
                raise
            log.warning("daemon %d: router at %s/v1, dashboard %s/ui", os.getpid(), url, url)
        self.paths.pid_file.write_text(f"{os.getpid()}\n")
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        log.warning("daemon %d listening on %s", os.getpid(), self.paths.socket)
        self.listening.set()
        if ready is not None:
            with contextlib.suppress(OSError):
                ready.write(f"{os.getpid()}\n".encode())
                ready.close()
        try:
            await self._until_idle_or_stopped()
        finally:
            await self._shutdown()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _bind(self) -> socket.socket:
        # we hold the lock: whatever socket file is there belongs to a dead daemon
        with contextlib.suppress(FileNotFoundError):
            self.paths.socket.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: no window in which others may connect
        try:
            listener.bind(str(self.paths.socket))
        finally:
            os.umask(old)
        listener.listen(128)
        return listener

    async def _until_idle_or_stopped(self) -> None:
        while not self._stop.is_set():
            left = self._idle_left()
            if left is not None and left <= 0:
                log.warning("idle for %.0f s: exiting", self.idle_timeout)
                return
            self._activity.clear()
            waiters = {
                asyncio.ensure_future(self._activity.wait()),
                asyncio.ensure_future(self._stop.wait()),
            }
            await asyncio.wait(waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()

    def _idle_left(self) -> float | None:
        """Seconds until the daemon has been idle for ``idle_timeout``; None while a client is
        attached or a request runs. With ``--http``, requests to the router count too (they
        are seen when the daemon looks again, not as they come)."""
        if self._clients or self._busy:
            return None
        last = self._last_activity
        if self.http is not None:
            ended, in_flight = self.supervisor.last_request()
            if in_flight:
                return self.idle_timeout  # look again then
            last = max(last, ended)
        return last + self.idle_timeout - time.monotonic()

    async def _shutdown(self) -> None:
        self._shutting_down = True
        server = self._server
        if server is not None:
            server.close()  # stops accepting and closes the listener
        with contextlib.suppress(FileNotFoundError):
            self.paths.socket.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.paths.pid_file.unlink()
        if self.http is not None:
            await self.http.stop()
        await self.supervisor.stop()
        log.warning("daemon %d stopped", os.getpid())

    def _touch(self) -> None:
        self._last_activity = time.monotonic()
        self._activity.set()

    # -- clients ----------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients += 1
        self._touch()
        try:
            while not reader.at_eof():
                try:
                    line = await reader.readline()
                except (ValueError, ConnectionError):  # over-long line, or the client went away
                    break
                if not line.strip():
                    continue
                self._busy += 1
                try:
                    reply = await self._dispatch(line)
                finally:
                    self._busy -= 1
                    self._touch()
                writer.write(json.dumps(reply).encode() + b"\n")
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
        finally:
            self._clients -= 1
            self._touch()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ConfigError("a request is a JSON object")
            return {"ok": True, "data": await self._answer(request.pop("op", None), request)}
        except json.JSONDecodeError as exc:
            return _error_reply(ConfigError(f"not JSON: {exc}"))
        except _ShuttingDown as exc:
            return _error_reply(exc, retry=True)
        except (LlamactlError, OSError, TypeError, ValueError) as exc:
            return _error_reply(exc)

    async def _answer(self, op: object, request: dict[str, Any]) -> Any:
        from procman.daemon._request import ServeRequest, ensure_served, server_info  # speed

        match op:
            case "serve":
                if self._shutting_down:
                    raise _ShuttingDown("daemon is shutting down", hint="connect again")
                server = await ensure_served(self.supervisor, ServeRequest.from_json(request))
                return server_info(server).to_json()
            case "status":
                servers = [server_info(s).to_json() for s in self.supervisor.servers.values()]
                http = self.http.url if self.http is not None else None
                return {
                    "pid": os.getpid(),
                    "clients": self._clients,
                    "servers": servers,
                    "http": http,
                }
            case "remove":
                await self.supervisor.remove(str(request.get("name")))
                return None
            case "stop":
                self._stop.set()
                return None
            case _:
                raise ConfigError(f"unknown op {op!r}", hint="serve, status, remove or stop")


def run_daemon(
    *,
    socket_path: Path | None = None,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    home: Path | None = None,
    ready: IO[bytes] | None = None,
    http_port: int | None = None,
) -> bool:
    """Be the daemon until idle or stopped; False at once if another daemon holds the lock."""
    paths = DaemonPaths.default(socket_path, home)
    paths.prepare()
    lock_fd = open_lock(paths.lock)
    try:
        if not try_lock(lock_fd):
            return False
        from procman._loop import run  # speed

        daemon = Daemon(paths, idle_timeout=idle_timeout, http_port=http_port)
        run(daemon.run(lock_fd, ready))
        return True
    finally:
        os.close(lock_fd)  # the last step of the shutdown: releases the lock


def main(argv: list[str] | None = None) -> int:
    """``python -m procman.daemon``: how clients launch the daemon (no CLI dependencies)."""
    import argparse  # speed

    parser = argparse.ArgumentParser(prog="python -m procman.daemon")
    parser.add_argument("--socket", type=Path, default=None)
    parser.add_argument("--idle-timeout", default=str(DEFAULT_IDLE_TIMEOUT))
    parser.add_argument("--ready-fd", type=int, default=None)
    parser.add_argument("--http", type=int, default=None, metavar="PORT")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    ready = os.fdopen(options.ready_fd, "wb") if options.ready_fd is not None else None
    try:
        started = run_daemon(
            socket_path=options.socket,
            idle_timeout=duration_option(options.idle_timeout, "--idle-timeout"),
            ready=ready,
            http_port=options.http,
        )
    except LlamactlError as exc:
        log.error("%s", exc.message)  # noqa: TRY400 - the message is the report; no traceback
        return 1
    finally:
        if ready is not None:
            with contextlib.suppress(OSError):
                ready.close()
    if not started:
        log.warning("another daemon is running: exiting")
    return 0
