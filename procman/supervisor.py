"""The supervisor: every managed server by name, one event stream for all of them.

Today ``llamactl serve`` runs one server; the supervisor is shaped for many
(on-demand loading, idle TTL, ``max_loaded`` and per-model queues come next):
servers are registered by name and alias, looked up by the ``model`` a
request names, and all publish into one :class:`~procman.events.EventBus`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from types import MappingProxyType, TracebackType

from procman.errors import ConfigError
from procman.events import EventBus
from procman.policy import RestartPolicy
from procman.server import ManagedServer
from procman.spec import ServerSpec

__all__ = ["Supervisor"]


class Supervisor:
    """Owns :class:`ManagedServer` objects; leaving ``async with Supervisor()`` stops them all."""

    def __init__(self, *, bus: EventBus | None = None) -> None:
        self.bus = bus or EventBus()
        self._servers: dict[str, ManagedServer] = {}

    @property
    def servers(self) -> Mapping[str, ManagedServer]:
        return MappingProxyType(self._servers)

    def upstreams(self) -> Sequence[ManagedServer]:
        return list(self._servers.values())

    def add(
        self, spec: ServerSpec, *, policy: RestartPolicy | None = None, validate: bool = True
    ) -> ManagedServer:
        """Register a server (not started); its name and aliases must be unique."""
        taken = {
            name for server in self._servers.values() for name in (server.name, *server.aliases)
        }
        if clash := sorted({spec.name, *spec.aliases} & taken):
            raise ConfigError(f"model name already served: {', '.join(clash)}")
        server = ManagedServer(spec, bus=self.bus, policy=policy, validate=validate)
        self._servers[spec.name] = server
        return server

    async def serve(self, spec: ServerSpec) -> ManagedServer:
        """Register and start a server; returns once it is ready (raises as ``start`` does)."""
        server = self.add(spec)
        await server.start()
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

    async def remove(self, name: str) -> None:
        server = self._servers.pop(name, None)
        if server is not None:
            await server.stop("removed")

    async def stop(self) -> None:
        """Stop every server concurrently (each: SIGTERM, grace, SIGKILL)."""
        await asyncio.gather(
            *(server.stop("supervisor stopping") for server in self._servers.values())
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
