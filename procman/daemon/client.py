"""Talk to the shared daemon (:mod:`procman.daemon.service`), starting it if none runs.

::

    with procman.connect() as client:        # attaches, or starts the daemon
        server = client.serve("demo")        # one server however many clients ask
        server.base_url

The connection stays open while the client lives: that is what tells the
daemon someone still needs its servers. The client is blocking and
thread-safe (one request at a time per connection).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from procman.daemon._request import ServeRequest, ServerInfo, Serving
from procman.daemon.service import DEFAULT_IDLE_TIMEOUT, DaemonPaths, daemon_alive, open_lock
from procman.errors import (
    AdmissionError,
    ConfigError,
    DaemonError,
    LlamactlError,
    ModelError,
    ServerError,
    StartupTimeout,
)

if TYPE_CHECKING:
    pass

__all__ = ["DaemonClient", "DaemonStatus", "connect"]

_ERRORS: dict[str, type[LlamactlError]] = {
    cls.__name__: cls
    for cls in (AdmissionError, ConfigError, DaemonError, ModelError, ServerError, StartupTimeout)
}
_LAUNCH_ATTEMPTS = 3
_POLL = 0.02


@dataclass(frozen=True, kw_only=True)
class DaemonStatus:
    pid: int
    clients: int
    servers: tuple[ServerInfo, ...]
    http: str | None = None
    """With ``--http``: the router's base URL (``/v1``, ``/ui``); its key is in ``http.json``."""


class _Retry(Exception):
    """The daemon answered "shutting down": reconnect (starting a new one) and ask again."""


class DaemonClient(Serving):
    """One connection to the daemon; use :func:`connect` to make one."""

    def __init__(
        self, paths: DaemonPaths, *, idle_timeout: float, start: bool, timeout: float
    ) -> None:
        self.paths = paths
        self.idle_timeout = idle_timeout
        self.start = start
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._lock = threading.Lock()
        self.daemon_pid: int | None = None

    # -- requests ---------------------------------------------------------------------------
    def serve_request(self, request: ServeRequest) -> ServerInfo:
        """:meth:`serve`'s work: ask the daemon (shared with other clients)."""
        path = Path(request.model).expanduser()
        if path.exists():  # the daemon's working directory is not ours
            request = dataclasses.replace(request, model=str(path.resolve()))
        data = self.request("serve", request.to_json(), timeout=request.startup_timeout + 30)
        return ServerInfo.from_json(data)

    def status(self) -> DaemonStatus:
        data = self.request("status")
        servers = tuple(ServerInfo.from_json(s) for s in data["servers"])
        return DaemonStatus(
            pid=data["pid"], clients=data["clients"], servers=servers, http=data.get("http")
        )

    def remove(self, name: str) -> None:
        self.request("remove", {"name": name})

    def stop_daemon(self) -> None:
        """Ask the daemon to stop its servers and exit."""
        self.request("stop")
        self.close()

    def request(
        self, op: str, fields: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Send one request, return the reply's ``data``; raises the error the daemon reports."""
        line = json.dumps({"op": op, **(fields or {})}).encode() + b"\n"
        with self._lock:
            for _ in range(_LAUNCH_ATTEMPTS):
                try:
                    return self._exchange(line, timeout or self.timeout)
                except _Retry:
                    self._disconnect()
                    self._connect()
            raise DaemonError("the daemon kept shutting down while we asked it")

    def _exchange(self, line: bytes, timeout: float) -> Any:
        if self._sock is None:
            self._connect()
        sock = self._sock
        assert sock is not None  # noqa: S101 - _connect sets it or raises
        sock.settimeout(timeout)
        try:
            sock.sendall(line)
            reply = self._read_line(sock)
        except (BrokenPipeError, ConnectionResetError) as exc:  # daemon exited under us
            raise _Retry from exc
        except TimeoutError as exc:
            self._disconnect()  # a late reply must not be read as the next one's
            raise DaemonError(f"no reply from the daemon in {timeout:.0f} s") from exc
        if reply is None:
            raise _Retry
        if reply.get("ok"):
            return reply.get("data")
        error = reply.get("error") or {}
        if error.get("retry"):
            raise _Retry
        cls = _ERRORS.get(error.get("type", ""), DaemonError)
        message = error.get("message") or "the daemon reported an error"
        if issubclass(cls, ServerError):
            raise cls(message, log_tail=error.get("log_tail", ""), hint=error.get("hint"))
        raise cls(message, hint=error.get("hint"))

    def _read_line(self, sock: socket.socket) -> dict[str, Any] | None:
        while b"\n" not in self._buffer:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        return reply

    # -- connection -------------------------------------------------------------------------
    def _try_connect(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.paths.socket))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return False
        self._sock = sock
        self._buffer = b""
        return True

    def _connect(self) -> None:
        """Attach to the daemon; start one if none runs (exactly one, however many race)."""
        if self._try_connect():
            return
        if not self.start:
            raise DaemonError(
                f"no daemon listens on {self.paths.socket}", hint="start one: `llamactl daemon`"
            )
        self.paths.prepare()
        deadline = time.monotonic() + self.timeout
        spawn_fd = open_lock(self.paths.spawn_lock)
        try:
            fcntl.flock(spawn_fd, fcntl.LOCK_EX)  # one client at a time decides to launch
            launches = 0
            while not self._try_connect():
                if time.monotonic() > deadline:
                    raise DaemonError(
                        f"the daemon did not come up within {self.timeout:.0f} s",
                        hint=f"see its log: {self.paths.log}",
                    )
                if daemon_alive(self.paths):  # starting, or finishing its shutdown
                    time.sleep(_POLL)
                    continue
                if launches == _LAUNCH_ATTEMPTS:
                    raise DaemonError(
                        "the daemon exited at start", hint=f"see its log: {self.paths.log}"
                    )
                launches += 1
                self._launch(deadline)
        finally:
            os.close(spawn_fd)

    def _launch(self, deadline: float) -> None:
        """Start a detached daemon and wait until it says it listens (or exits)."""
        argv = [sys.executable, "-m", "procman.daemon", "--idle-timeout", str(self.idle_timeout)]
        argv += ["--socket", str(self.paths.socket)]
        read_end, write_end = os.pipe()
        try:
            with self.paths.log.open("ab") as log:
                self.paths.log.chmod(0o600)
                process = subprocess.Popen(
                    [*argv, "--ready-fd", str(write_end)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(write_end,),
                    start_new_session=True,  # no terminal signals, outlives this client
                    cwd="/",
                )
            os.close(write_end)
            write_end = -1
            # reap it when it exits, so that it never lingers as our zombie
            threading.Thread(target=process.wait, daemon=True).start()
            # the daemon writes its pid once it listens; EOF means it exited (or lost the lock)
            left = max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([read_end], [], [], left)
            if readable and (pid := os.read(read_end, 64).strip()):
                self.daemon_pid = int(pid)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)

    def _disconnect(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
            self._buffer = b""

    def close(self) -> None:
        """Detach; the daemon keeps its servers for others until it is idle."""
        with self._lock:
            self._disconnect()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def connect(
    *,
    socket_path: str | os.PathLike[str] | None = None,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    start: bool = True,
    timeout: float = 30.0,
) -> DaemonClient:
    """Attach to the shared daemon, starting one (detached) if none runs.

    ``idle_timeout`` applies only to a daemon this call starts. Raises
    :class:`~procman.DaemonError` if none can be reached within ``timeout``.
    """
    paths = DaemonPaths.default(Path(socket_path) if socket_path else None)
    client = DaemonClient(paths, idle_timeout=idle_timeout, start=start, timeout=timeout)
    with client._lock:
        client._connect()
    return client
