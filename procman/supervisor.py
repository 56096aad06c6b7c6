"""The supervisor: every managed server by name, one event stream for all of them.

Servers are registered by name and alias, looked up by the ``model`` a
request names, and all publish into one :class:`~procman.events.EventBus`.

Servers added with ``on_demand=True`` (what ``serve --config`` does) start
when the first request for them arrives and stop after ``ttl`` seconds
without one. ``max_loaded`` bounds how many run at once: loading one more
first stops the least recently used server that no request is using. "In
use" is counted by :meth:`Supervisor.using`, which the router holds for a
request's whole life, waiting in its queue included, so that an idle timer
never stops a model that has requests waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any

from procman.errors import ConfigError
from procman.events import EventBus
from procman.policy import RestartPolicy
from procman.server import ManagedServer
from procman.spec import ServerSpec

__all__ = ["Supervisor"]


@dataclass(eq=False)
class _Entry:
    """Book-keeping beside one server: who uses it, since when it is idle, its timer."""

    server: ManagedServer
    ttl: float | None
    on_demand: bool
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)
    timer: asyncio.TimerHandle | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def loaded(self) -> bool:
        return not self.server.state.is_final


class Supervisor:
    """Owns :class:`ManagedServer` objects; leaving ``async with Supervisor()`` stops them all."""

    def __init__(self, *, bus: EventBus | None = None, max_loaded: int | None = None) -> None:
        if max_loaded is not None and max_loaded < 1:
            raise ConfigError(f"max_loaded must be at least 1, got {max_loaded}")
        self.bus = bus or EventBus()
        self.max_loaded = max_loaded
        self._servers: dict[str, ManagedServer] = {}
        self._entries: dict[str, _Entry] = {}
        self._room = asyncio.Lock()  # one load at a time decides who makes room
        self._idle = asyncio.Event()  # set (and replaced) whenever a server becomes idle
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def servers(self) -> Mapping[str, ManagedServer]:
        return MappingProxyType(self._servers)

    def upstreams(self) -> Sequence[ManagedServer]:
        return list(self._servers.values())

    def add(
        self,
        spec: ServerSpec,
        *,
        policy: RestartPolicy | None = None,
        validate: bool = True,
        ttl: float | None = None,
        on_demand: bool = False,
    ) -> ManagedServer:
        """Register a server (not started); its name and aliases must be unique.

        ``on_demand``: requests start it when it is stopped (or failed);
        ``ttl``: seconds without requests after which it is stopped.
        """
        taken = {
            name for server in self._servers.values() for name in (server.name, *server.aliases)
        }
        if clash := sorted({spec.name, *spec.aliases} & taken):
            raise ConfigError(f"model name already served: {', '.join(clash)}")
        server = ManagedServer(spec, bus=self.bus, policy=policy, validate=validate)
        self._servers[spec.name] = server
        self._entries[spec.name] = _Entry(server, ttl, on_demand)
        return server

    async def serve(self, spec: ServerSpec) -> ManagedServer:
        """Register and start a server; returns once it is ready (raises as ``start`` does)."""
        server = self.add(spec)
        await self.load(spec.name)
        return server

    def find(self, model: str | None) -> ManagedServer | None:
        """The server a request's ``model`` names.

        With a single server any name (or none) reaches it, as clients often
        send a fixed name such as ``gpt-4o-mini``. With several, the name or an
        alias must match; an absent name is ambiguous.
        """
        if len(self._servers) == 1:
            return next(iter(self._servers.values()))
        if model is None:
            return None
        for server in self._servers.values():
            if model == server.name or model in server.aliases:
                return server
        return None

    def on_demand(self, name: str) -> bool:
        """Whether requests start this server (so being stopped is not a fault)."""
        entry = self._entries.get(name)
        return entry is not None and entry.on_demand

    # -- loading and unloading -------------------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(self._entries) or "none"
            raise ConfigError(f"no model named {name!r}", hint=f"configured: {known}")
        return entry

    async def load(self, name: str) -> ManagedServer:
        """Start ``name`` unless it runs already; returns once it is ready.

        Makes room under ``max_loaded`` first, waiting for a server to become
        idle if all are busy. Raises as :meth:`ManagedServer.start` does.
        """
        entry = self._entry(name)
        async with entry.lock:
            if entry.loaded:
                return entry.server
            async with self._room:
                await self._make_room(entry)
                entry.last_used = time.monotonic()
                await entry.server.start()
        if entry.users == 0:
            self._arm(entry)
        return entry.server

    async def unload(self, name: str, reason: str = "unloaded on request") -> None:
        """Stop ``name`` (it stays configured; an on-demand model starts again when asked for)."""
        entry = self._entry(name)
        async with entry.lock:
            self._disarm(entry)
            await entry.server.stop(reason)

    async def _make_room(self, entry: _Entry) -> None:
        while self.max_loaded is not None:
            loaded = [e for e in self._entries.values() if e is not entry and e.loaded]
            if len(loaded) < self.max_loaded:
                return
            idle = [e for e in loaded if e.users == 0]
            if not idle:
                await self._idle.wait()  # every loaded model is serving: wait for one to finish
                continue
            victim = min(idle, key=lambda e: e.last_used)
            reason = f"making room for {entry.server.name!r} (max_loaded={self.max_loaded})"
            async with victim.lock:
                self._disarm(victim)
                await victim.server.stop(reason)

    @contextlib.asynccontextmanager
    async def using(self, name: str) -> AsyncIterator[None]:
        """Mark ``name`` busy for the block: no idle timer or eviction stops it meanwhile."""
        entry = self._entry(name)
        entry.users += 1
        self._disarm(entry)
        try:
            yield
        finally:
            entry.users -= 1
            entry.last_used = time.monotonic()
            if entry.users == 0:
                self._arm(entry)
                self._idle.set()
                self._idle = asyncio.Event()

    def _arm(self, entry: _Entry) -> None:
        self._disarm(entry)
        if entry.ttl is not None and entry.loaded:
            loop = asyncio.get_running_loop()
            entry.timer = loop.call_later(entry.ttl, self._expire, entry)

    def _disarm(self, entry: _Entry) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None

    def _expire(self, entry: _Entry) -> None:
        entry.timer = None
        if entry.users or not entry.loaded:
            return
        reason = f"idle for {entry.ttl:g} s (ttl)"
        task = asyncio.create_task(self._expire_now(entry, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _expire_now(self, entry: _Entry, reason: str) -> None:
        async with entry.lock:
            if entry.users == 0 and entry.timer is None:  # nobody came meanwhile
                await entry.server.stop(reason)

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """Per server: what ``llamactl ps`` shows (state, pid, private port, RSS, restarts...)."""
        now = time.monotonic()
        rows = []
        for name, entry in self._entries.items():
            server = entry.server
            rows.append(
                {
                    "name": name,
                    "aliases": list(server.aliases),
                    "state": str(server.state),
                    "reason": server.last_reason,
                    "pid": server.pid,
                    "port": server.port,
                    "model": str(server.spec.model),
                    "rss_bytes": _rss(server.pid),
                    "restarts": server.restarts,
                    "in_use": entry.users,
                    "idle_seconds": None if entry.users else round(now - entry.last_used, 3),
                    "ttl": entry.ttl,
                    "on_demand": entry.on_demand,
                }
            )
        return rows

    async def remove(self, name: str) -> None:
        server = self._servers.pop(name, None)
        entry = self._entries.pop(name, None)
        if entry is not None:
            self._disarm(entry)
        if server is not None:
            await server.stop("removed")

    async def stop(self) -> None:
        """Stop every server concurrently (each: SIGTERM, grace, SIGKILL)."""
        for entry in self._entries.values():
            self._disarm(entry)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(
            *(server.stop("supervisor stopping") for server in self._servers.values()),
            *self._tasks,
            return_exceptions=True,
        )

    async def __aenter__(self) -> Supervisor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _rss(pid: int | None) -> int | None:
    """Resident memory of the server process, or None when it is not running (or just exited)."""
    if pid is None:
        return None
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.Error, OSError):
        return None
