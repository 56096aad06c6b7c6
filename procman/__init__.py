"""Run GGUF models under llama-server, supervised, behind one OpenAI-compatible endpoint.

The library a desktop app embeds and the ``llamactl`` CLI drives. Blocking::

    with procman.Supervisor() as sup:              # owns its servers; they end with it
        sup.on_event(print)                        # state changes (called from its loop thread)
        server = sup.serve("model.gguf", ctx=2048) # returns when ready
        server.base_url                            # http://127.0.0.1:PORT/v1

    with procman.connect() as client:              # the shared daemon, started if none runs
        server = client.serve("demo")

Async, the core the blocking facade runs on a private loop thread::

    spec = ServerSpec(name="demo", model=path, binary=resolve_server().binary)
    async with AsyncSupervisor() as supervisor:
        async with supervisor.bus.listen() as events: ...  # or bus.subscribe(callback)
        await supervisor.serve(spec)                # validated, spawned, ready
        async with Router(supervisor) as router:
            await router.start(bind_listener("127.0.0.1", 8080))
            ...

It never prints, exits or configures logging. ``import procman`` stays fast:
the modules that need aiohttp (server, supervisor, router), and the daemon
client, load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from procman._ports import bind_listener, check_exposure, pick_free_port
from procman.errors import (
    AdmissionError,
    ConfigError,
    DaemonError,
    LlamactlError,
    ModelError,
    PortInUseError,
    ServerError,
    StartupTimeout,
)
from procman.events import Event, EventBus, State, Subscription
from procman.logs import follow, log_path, read_tail
from procman.policy import Action, Decision, RestartPolicy
from procman.spec import (
    HealthSettings,
    LogSettings,
    RestartSettings,
    ServerSpec,
    default_name,
    parse_gpu_layers,
    resolve_model,
)

if TYPE_CHECKING:
    from procman._request import ServeRequest, ServerInfo
    from procman._sync import Supervisor
    from procman.client import DaemonClient, DaemonStatus, connect
    from procman.model_file import ModelInfo, validate_model
    from procman.router import Router, RouterSettings
    from procman.server import ManagedServer
    from procman.supervisor import Supervisor as AsyncSupervisor

__all__ = [
    "Action",
    "AdmissionError",
    "AsyncSupervisor",
    "ConfigError",
    "DaemonClient",
    "DaemonError",
    "DaemonStatus",
    "Decision",
    "Event",
    "EventBus",
    "HealthSettings",
    "LlamactlError",
    "LogSettings",
    "ManagedServer",
    "ModelError",
    "ModelInfo",
    "PortInUseError",
    "RestartPolicy",
    "RestartSettings",
    "Router",
    "RouterSettings",
    "ServeRequest",
    "ServerError",
    "ServerInfo",
    "ServerSpec",
    "StartupTimeout",
    "State",
    "Subscription",
    "Supervisor",
    "bind_listener",
    "check_exposure",
    "connect",
    "default_name",
    "follow",
    "log_path",
    "parse_gpu_layers",
    "pick_free_port",
    "read_tail",
    "resolve_model",
    "validate_model",
]

#: public names whose modules import aiohttp, gguf or sockets: name -> (module, attribute)
_LAZY = {
    "AsyncSupervisor": ("procman.supervisor", "Supervisor"),
    "DaemonClient": ("procman.client", "DaemonClient"),
    "DaemonStatus": ("procman.client", "DaemonStatus"),
    "ManagedServer": ("procman.server", "ManagedServer"),
    "ModelInfo": ("procman.model_file", "ModelInfo"),
    "Router": ("procman.router", "Router"),
    "RouterSettings": ("procman.router", "RouterSettings"),
    "ServeRequest": ("procman._request", "ServeRequest"),
    "ServerInfo": ("procman._request", "ServerInfo"),
    "Supervisor": ("procman._sync", "Supervisor"),
    "connect": ("procman.client", "connect"),
    "validate_model": ("procman.model_file", "validate_model"),
}


def __getattr__(name: str) -> Any:
    if target := _LAZY.get(name):
        module, attribute = target
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'procman' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
