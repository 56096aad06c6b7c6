"""One supervised ``ggml-rpc-server``: the process behind ``llamactl worker``.

The worker lends this machine's devices to a llama-server elsewhere. It gets
the same care as a server (own process group, death with llamactl, a rotating
log, restarts with backoff and the crash budget of
:mod:`procman.process.policy`), with what ggml-rpc-server needs on top:

* its exit status means nothing (it exits 0 after a bad argument and after a
  failed bind), so the port is checked before spawning and readiness is "the
  port accepts";
* its output is the only account of what it does: ``Starting RPC server
  vX.Y.Z``, the device list with total and free MiB, and ``Accepted client
  connection`` / ``Client connection closed`` around each leader. Those lines
  are read as they come and kept as :attr:`ManagedWorker.status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shlex
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from procman.distributed.rpc import format_endpoint, parse_endpoint
from procman.errors import ConfigError, PortInUseError, ServerError
from procman.events import EventBus, State
from procman.process._child import Child, describe_exit, spawn, terminate, within
from procman.process.logs import LineTail, RotatingLog
from procman.process.policy import Action, RestartPolicy, is_crash
from procman.spec import LogSettings, RestartSettings

__all__ = ["ManagedWorker", "WorkerSpec", "WorkerStatus", "check_listen", "port_free"]

log = logging.getLogger(__name__)

_STARTED = re.compile(rb"Starting RPC server v(\d+)\.(\d+)\.(\d+)")
_DEVICE = re.compile(rb"^\s+(\S+): (.*) \((\d+) MiB, (\d+) MiB free\)\s*$")
_ACCEPTED = b"Accepted client connection"
_CLOSED = b"Client connection closed"
_MIB = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """One ``ggml-rpc-server``: where it listens and what it lends."""

    binary: Path
    """The ``ggml-rpc-server`` executable (from the verified build)."""
    host: str = "127.0.0.1"
    """IPv4 address to listen on. Anything but loopback needs ``allow_network``: the RPC
    protocol has no authentication, so whoever reaches the port can use the devices."""
    port: int = 50052
    """The RPC port leaders connect to (``--rpc HOST:PORT``)."""
    devices: tuple[str, ...] = ()
    """Devices to lend (``-d``, e.g. ``CUDA0``); empty: all of them."""
    threads: int | None = None
    """CPU threads for the CPU device (``-t``); ``None``: ggml-rpc-server's default."""
    cache: bool = False
    """Keep large tensors (over 10 MiB) in a local file cache (``-c``, under
    ``$LLAMA_CACHE/rpc``), so that a leader's next load sends only their hashes."""
    allow_network: bool = False
    """Let ``host`` be a non-loopback address (see ``host``)."""
    name: str = ""
    """Names the log file and events; default ``worker-PORT``."""
    startup_timeout: float = 30.0
    """Seconds from spawn until the port must accept."""
    stop_grace: float = 5.0
    restart: RestartSettings = field(default_factory=RestartSettings)
    log: LogSettings = field(default_factory=LogSettings)

    def __post_init__(self) -> None:
        check_listen(self.host, self.port, allow_network=self.allow_network)
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")

    @property
    def label(self) -> str:
        return self.name or f"worker-{self.port}"

    @property
    def endpoint(self) -> str:
        return format_endpoint(self.host, self.port)

    def argv(self) -> list[str]:
        argv = [str(self.binary), "-H", self.host, "-p", str(self.port)]
        if self.devices:
            argv += ["-d", ",".join(self.devices)]
        if self.threads is not None:
            argv += ["-t", str(self.threads)]
        if self.cache:
            argv.append("-c")
        return argv


def check_listen(host: str, port: int, *, allow_network: bool) -> None:
    """Where a worker may listen: an IPv4 address, loopback unless the network is allowed."""
    import ipaddress  # speed

    parse_endpoint(format_endpoint(host, port))  # IPv4 literal and port range
    if not allow_network and not ipaddress.IPv4Address(host).is_loopback:
        raise ConfigError(
            f"refusing to lend this machine's devices on {host}: the RPC protocol has "
            "no authentication, so anyone who reaches the port could run work on them and "
            "read what they hold",
            hint="keep the default 127.0.0.1, or pass --allow-network on a network you "
            "trust (a direct cable, a private VLAN), never on the internet",
        )


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now (ggml-rpc-server sets SO_REUSEADDR too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(kw_only=True)
class WorkerStatus:
    """What the worker's output said, kept current as it runs."""

    protocol: str | None = None
    devices: list[dict[str, Any]] = field(default_factory=list)
    leader_since: float | None = None
    """time.time() when the current client (a leader, or a probe) connected; None while free."""
    connections: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "devices": self.devices,
            "busy": self.leader_since is not None,
            "leader_since": self.leader_since,
            "connections": self.connections,
        }


class _Lines(LineTail):
    """The tail of the worker's output, reading each complete line for its status."""

    def __init__(self, status: WorkerStatus, on_banner: Callable[[], None] | None = None) -> None:
        super().__init__(40)
        self.status = status
        self.on_banner = on_banner
        self._pending = b""

    def feed(self, data: bytes) -> None:
        super().feed(data)
        *lines, self._pending = (self._pending + data).split(b"\n")
        for line in lines:
            self._read(line.rstrip(b"\r"))

    def _read(self, line: bytes) -> None:
        status = self.status
        if started := _STARTED.search(line):
            status.protocol = ".".join(g.decode() for g in started.groups())
            status.devices = []
        elif device := _DEVICE.match(line):
            name, description, total, free = device.groups()
            status.devices.append(
                {
                    "name": name.decode(errors="replace"),
                    "description": description.decode(errors="replace"),
                    "total": int(total) * _MIB,
                    "free": int(free) * _MIB,
                }
            )
        elif _ACCEPTED in line:
            if self.on_banner is not None:  # the banner (devices included) came before it
                self.on_banner()
            status.leader_since = time.time()
            status.connections += 1
        elif _CLOSED in line:
            status.leader_since = None


class ManagedWorker:
    """One ggml-rpc-server under supervision: ``async with ManagedWorker(spec) as w:``."""

    def __init__(self, spec: WorkerSpec, *, bus: EventBus | None = None) -> None:
        self.spec = spec
        self.bus = bus or EventBus()
        self.policy = RestartPolicy(spec.restart)
        self.status = WorkerStatus()
        self.state = State.STOPPED
        self.last_reason = "not started"
        self.pid: int | None = None
        self.restarts = 0
        self.started_at: float | None = None
        self._log = RotatingLog(
            spec.log.path_for(spec.label), max_bytes=spec.log.max_bytes, backups=spec.log.backups
        )
        self._tail = _Lines(self.status, self._on_banner)
        self._task: asyncio.Task[None] | None = None
        self._banner: asyncio.Event | None = None

    @property
    def log_path(self) -> Path:
        return self.spec.log.path_for(self.spec.label)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.spec.label,
            "endpoint": self.spec.endpoint,
            "state": str(self.state),
            "reason": self.last_reason,
            "pid": self.pid,
            "restarts": self.restarts,
            "cache": self.spec.cache,
            **self.status.to_json(),
        }

    async def __aenter__(self) -> ManagedWorker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _set(self, state: State, reason: str, *, log_tail: str = "") -> None:
        previous, self.state = self.state, state
        self.last_reason = reason
        log.info("%s: %s -> %s (%s)", self.spec.label, previous, state, reason)
        self.bus.emit(self.spec.label, state, previous, reason, pid=self.pid, log_tail=log_tail)

    def _on_banner(self) -> None:
        if self._banner is not None:
            self._banner.set()

    async def start(self) -> None:
        """Check the port, spawn, return once the port accepts; :class:`PortInUseError` or
        :class:`ServerError` (with the log tail) if it cannot."""
        if self._task is not None and not self._task.done():
            raise ServerError(f"{self.spec.label} is already running")
        if not port_free(self.spec.host, self.spec.port):
            raise PortInUseError(self.spec.host, self.spec.port)
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.policy.reset()
        self._task = asyncio.create_task(self._supervise(first), name=f"llamactl-{self.spec.label}")
        try:
            await asyncio.shield(first)
        except BaseException:
            await self.stop("start failed")
            raise

    async def stop(self, reason: str = "stop requested") -> None:
        task = self._task
        if task is None or task.done():
            if not self.state.is_final:
                self._set(State.STOPPED, reason)
            return
        self._set(State.STOPPING, reason)
        task.cancel()
        await asyncio.wait({task})
        self._set(State.STOPPED, reason)

    async def wait(self) -> None:
        """Until supervision ends (failed, or stopped)."""
        if self._task is not None:
            await asyncio.wait({self._task})

    async def _supervise(self, first: asyncio.Future[None]) -> None:
        ever_ready = False
        try:
            while True:
                code, reason = await self._one_life(first)
                tail = self._tail.text()
                if first.done() and not ever_ready:
                    ever_ready = True
                if not ever_ready:
                    message = f"ggml-rpc-server did not start: {reason}"
                    self._set(State.FAILED, message, log_tail=tail)
                    if not first.done():
                        first.set_exception(
                            ServerError(message, log_tail=tail, hint=f"full log: {self.log_path}")
                        )
                    return
                now = time.monotonic()
                # ggml-rpc-server never ends on its own: any end we did not ask for counts,
                # exit status 0 included, except a stop signal from someone else
                crash = code is None or code == 0 or is_crash(code)
                decision = self.policy.on_crash(now, reason, crash=crash)
                if decision.action is Action.GIVE_UP:
                    self._set(State.FAILED, decision.reason, log_tail=tail)
                    return
                self.restarts += 1
                self._set(State.RESTARTING, decision.reason, log_tail=tail)
                await asyncio.sleep(decision.delay)  # a timed backoff; stop() cancels it
                while not port_free(self.spec.host, self.spec.port):
                    # a leader's connection in TIME_WAIT does not block the bind (SO_REUSEADDR);
                    # another process on the port does: wait for it rather than crash-loop
                    self._set(State.RESTARTING, f"port {self.spec.endpoint} is taken; waiting")
                    await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            if not first.done():
                first.set_exception(
                    ServerError(f"{self.spec.label} was stopped before it listened")
                )
            raise
        finally:
            self.pid = None
            self.status.leader_since = None
            self._log.close()

    async def _one_life(self, first: asyncio.Future[None]) -> tuple[int | None, str]:
        argv = self.spec.argv()
        self._tail.clear()
        self._banner = asyncio.Event()
        stamp = datetime.now().astimezone().isoformat(timespec="seconds")
        self._log.write(f"\n--- llamactl {stamp}: {shlex.join(argv)}\n".encode())
        try:
            # SIGPIPE ignored: ggml-rpc-server b11312 writes to its leader without
            # MSG_NOSIGNAL, and dies of SIGPIPE when the leader went while it computed
            # (seen after SIGSTOP, leader killed, SIGCONT); with EPIPE it drops the
            # connection and accepts the next leader
            transport, child = await spawn(argv, self._log, self._tail, ignore_sigpipe=True)
        except OSError as exc:
            return None, f"cannot run {self.spec.binary}: {exc.strerror or exc}"
        self.pid = transport.get_pid()
        self.started_at = time.monotonic()
        self._set(State.STARTING, f"spawned pid {self.pid} on {self.spec.endpoint}")
        try:
            if not await self._wait_listening(child):
                if child.exited.done():
                    code = child.exited.result()
                    return code, f"exited before listening: {describe_exit(code)}"
                return None, f"not listening after {self.spec.startup_timeout:g} s; killed"
            # its stdout is a pipe, so block-buffered: the banner (protocol, devices) arrives
            # with the fflush after "Accepted client connection", which the readiness probe
            # caused; wait for it briefly so that READY comes with a complete status
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._banner.wait(), 2.0)
            self.policy.on_ready(time.monotonic())
            self._set(State.READY, f"listening on {self.spec.endpoint}")
            if not first.done():
                first.set_result(None)
            code = await child.exited
            return code, f"ggml-rpc-server {describe_exit(code)}"
        finally:
            await terminate(transport, child, self.spec.stop_grace, self.spec.label)
            self.pid = None
            self.status.leader_since = None

    async def _wait_listening(self, child: Child) -> bool:
        """Poll the port until it accepts; False if the process exits or time runs out.

        The poll is a connect and an immediate close: the worker accepts it,
        reads nothing and logs one connection closed.
        """
        deadline = time.monotonic() + self.spec.startup_timeout
        while time.monotonic() < deadline:
            if child.exited.done():
                return False
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.spec.host, self.spec.port), 1.0
                )
            except (OSError, TimeoutError):
                if await within(child.exited, 0.05):
                    return False
                continue
            writer.close()
            return True
        return False
