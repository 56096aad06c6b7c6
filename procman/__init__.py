"""Run GGUF models under llama-server, supervised, behind one OpenAI-compatible endpoint.

The library a desktop app embeds and the ``llamactl`` CLI drives::

    spec = ServerSpec(name="demo", model=path, binary=resolve_server().binary)
    async with Supervisor() as supervisor:
        supervisor.bus.subscribe(print)             # every state change, with a reason
        await supervisor.serve(spec)                # validated, spawned, ready
        async with Router(supervisor) as router:
            await router.start(bind_listener("127.0.0.1", 8080))
            ...

It never prints, exits or configures logging. ``import procman`` stays fast:
the modules that need aiohttp (server, supervisor, router) load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from procman._ports import bind_listener, pick_free_port
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
    from procman.model_file import ModelInfo, validate_model
    from procman.router import Router, RouterSettings, check_exposure
    from procman.server import ManagedServer
    from procman.supervisor import Supervisor

__all__ = [
    "Action",
    "AdmissionError",
    "ConfigError",
    "DaemonError",
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
    "ServerError",
    "ServerSpec",
    "StartupTimeout",
    "State",
    "Subscription",
    "Supervisor",
    "bind_listener",
    "check_exposure",
    "default_name",
    "follow",
    "log_path",
    "parse_gpu_layers",
    "pick_free_port",
    "read_tail",
    "resolve_model",
    "validate_model",
]

#: public names whose modules import aiohttp or gguf: loaded on first access
_LAZY = {
    "ManagedServer": "procman.server",
    "ModelInfo": "procman.model_file",
    "Router": "procman.router",
    "RouterSettings": "procman.router",
    "Supervisor": "procman.supervisor",
    "check_exposure": "procman.router",
    "validate_model": "procman.model_file",
}


def __getattr__(name: str) -> Any:
    if module := _LAZY.get(name):
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'procman' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
