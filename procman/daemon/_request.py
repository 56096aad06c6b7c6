"""What ``serve("model.gguf", ctx=2048)`` asks for, and what it answers, in one place.

The sync facade (:mod:`procman.daemon._sync`) and the shared daemon
(:mod:`procman.daemon.service`) both turn a :class:`ServeRequest` into a running
server with :func:`ensure_served`: there is one copy of that logic. Both
kinds of answer are a :class:`ServerInfo` snapshot, which is also what the
daemon sends over its socket (``to_json``/``from_json``).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from procman.errors import ConfigError, ServerError
from procman.events import State
from procman.models.refs import default_name, resolve_model
from procman.spec import GpuLayers, LogSettings, ServerSpec

if TYPE_CHECKING:
    from procman.process.server import ManagedServer
    from procman.supervisor import AsyncSupervisor

__all__ = ["ServeRequest", "ServerInfo", "Serving", "ensure_served", "server_info"]


@dataclass(frozen=True, kw_only=True)
class ServeRequest:
    """The keyword options of ``serve()``; raw input, turned into a spec by :meth:`to_spec`."""

    model: str
    """A .gguf path, a name in the model cache, or ``demo``."""
    name: str | None = None
    """Server name (what clients send as ``model``); default: from the model file."""
    ctx: int | None = None
    """Context size; ``None`` lets llama-server choose."""
    parallel: int | None = None
    """Slots served concurrently."""
    gpu_layers: GpuLayers | None = None
    """Layers on the GPU: a number, ``auto`` or ``all``."""
    args: tuple[str, ...] = ()
    """Further llama-server arguments."""
    binary: str | None = None
    """The llama-server to run; default: ``buildtools.resolve_server()`` ($LLAMACTL_SERVER...)."""
    startup_timeout: float = 120.0
    """Seconds the model may take to load."""
    log_dir: str | None = None
    """Folder of the server log; default: ``<llamactl home>/logs``."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["args"] = list(self.args)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServeRequest:
        known = set(cls.__dataclass_fields__)
        if unknown := sorted(set(data) - known):
            raise ConfigError(f"unknown serve option(s): {', '.join(unknown)}")
        if not isinstance(data.get("model"), str):
            raise ConfigError("serve needs a 'model' string")
        return cls(**{**data, "args": tuple(data.get("args") or ())})

    def to_spec(self) -> ServerSpec:
        """Resolve the model and the binary (blocking: may read the disk or fetch the demo)."""
        import buildtools  # speed

        model = resolve_model(self.model)
        binary = buildtools.resolve_server(self.binary).binary
        name = self.name or default_name(model, self.model)
        stem = model.name.removesuffix(".gguf")
        return ServerSpec(
            name=name,
            aliases=() if stem == name else (stem,),
            model=model,
            binary=binary,
            ctx=self.ctx,
            parallel=self.parallel,
            gpu_layers=self.gpu_layers,
            extra_args=self.args,
            startup_timeout=self.startup_timeout,
            log=LogSettings(directory=Path(self.log_dir) if self.log_dir else None),
            # the caller talks to the server itself: a loopback port behind a per-server key
            listen="tcp",
        )


@dataclass(frozen=True, kw_only=True)
class ServerInfo:
    """A snapshot of one managed server, as ``serve()`` and ``status()`` return it."""

    name: str
    state: State
    pid: int | None
    port: int | None
    url: str | None
    """The private server's root URL, ``http://127.0.0.1:PORT``."""
    api_key: str | None = field(default=None, repr=False)
    """The server's own key: send ``Authorization: Bearer KEY`` (an OpenAI client's
    ``api_key``). Only this user is told it; other local users cannot use the server."""
    model: str = ""
    aliases: tuple[str, ...] = field(default=())
    reason: str = ""
    """Why it is in this state (the last event's reason)."""
    rss: int | None = None
    """Resident memory of the server process in bytes, when the snapshot was taken."""

    @property
    def base_url(self) -> str | None:
        """The OpenAI-compatible base URL (``.../v1``) to give an OpenAI client."""
        return None if self.url is None else f"{self.url}/v1"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = str(self.state)
        data["aliases"] = list(self.aliases)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServerInfo:
        return cls(
            **{
                **data,
                "state": State(data["state"]),
                "aliases": tuple(data.get("aliases") or ()),
            }
        )


class Serving:
    """``serve(model, ...)`` as the blocking facade and the daemon client both offer it:
    the options become one :class:`ServeRequest`, which each answers its own way."""

    def serve(
        self,
        model: str,
        *,
        name: str | None = None,
        ctx: int | None = None,
        parallel: int | None = None,
        gpu_layers: GpuLayers | None = None,
        args: tuple[str, ...] | list[str] = (),
        binary: str | None = None,
        startup_timeout: float = 120.0,
        log_dir: str | None = None,
    ) -> ServerInfo:
        """Start ``model`` (or reuse the running server of that name); returns when it is
        ready. Raises :class:`~procman.ModelError`, :class:`~procman.ServerError` or
        :class:`~procman.StartupTimeout`."""
        request = ServeRequest(
            model=model,
            name=name,
            ctx=ctx,
            parallel=parallel,
            gpu_layers=gpu_layers,
            args=tuple(args),
            binary=binary,
            startup_timeout=startup_timeout,
            log_dir=log_dir,
        )
        return self.serve_request(request)

    def serve_request(self, request: ServeRequest) -> ServerInfo:
        raise NotImplementedError


def server_info(server: ManagedServer) -> ServerInfo:
    from procman.memory.meter import rss_bytes  # speed: psutil, for a snapshot only

    return ServerInfo(
        name=server.name,
        state=server.state,
        pid=server.pid,
        port=server.port,
        url=server.url,
        api_key=server.api_key,
        model=str(server.spec.model),
        aliases=server.aliases,
        reason=server.last_reason,
        rss=rss_bytes(server.pid),
    )


async def ensure_served(supervisor: AsyncSupervisor, request: ServeRequest) -> ManagedServer:
    """The server ``request`` names, started unless one of that name runs already.

    Concurrent requests for one name share one server: the first registers
    it (registration and the start of ``start()`` happen with no ``await``
    between them), the others wait for it to be ready. A server that failed or
    was stopped is replaced.
    """
    spec = await asyncio.to_thread(request.to_spec)
    reason, tail = "", ""
    for _ in range(3):  # a failed server is replaced; a concurrent replacement is joined
        existing = supervisor.servers.get(spec.name)
        if existing is None:
            return await supervisor.serve(spec)
        # a server being started reads as stopped until it spawns: wait, do not replace it
        if await existing.wait_ready(spec.startup_timeout):
            return existing
        if not existing.state.is_final:
            raise ServerError(
                f"server {spec.name!r} is not ready after {spec.startup_timeout:.0f} s",
                log_tail=existing.log_tail(),
                hint=f"log: {existing.log_path}",
            )
        reason, tail = existing.last_reason, existing.log_tail()
        if supervisor.servers.get(spec.name) is existing:
            await supervisor.remove(spec.name)
    raise ServerError(
        f"server {spec.name!r} keeps failing: {reason}",
        log_tail=tail,
        hint=f"log: {spec.log_path}",
    )
