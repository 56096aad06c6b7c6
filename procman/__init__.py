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

#: typing costs ~8 ms to import, paid by every `llamactl` run (the entry point is in this
#: package); mypy treats this name as typing.TYPE_CHECKING
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from procman._ports import bind_listener, check_exposure, pick_free_port
    from procman._request import ServeRequest, ServerInfo
    from procman._sync import Supervisor
    from procman.client import DaemonClient, DaemonStatus, connect
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
    from procman.model_file import ModelInfo, validate_model
    from procman.policy import Action, Decision, RestartPolicy
    from procman.router import Router, RouterSettings
    from procman.server import ManagedServer
    from procman.spec import (
        HealthSettings,
        LogSettings,
        RestartSettings,
        ServerSpec,
        default_name,
        parse_gpu_layers,
        resolve_model,
    )
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

#: every public name -> (module, attribute), imported on first use: ``import procman``
#: (and so the ``llamactl`` entry point, which lives in this package) costs nothing
_LAZY = {
    **dict.fromkeys(("bind_listener", "check_exposure", "pick_free_port"), "procman._ports"),
    **dict.fromkeys(
        (
            "AdmissionError",
            "ConfigError",
            "DaemonError",
            "LlamactlError",
            "ModelError",
            "PortInUseError",
            "ServerError",
            "StartupTimeout",
        ),
        "procman.errors",
    ),
    **dict.fromkeys(("Event", "EventBus", "State", "Subscription"), "procman.events"),
    **dict.fromkeys(("follow", "log_path", "read_tail"), "procman.logs"),
    **dict.fromkeys(("Action", "Decision", "RestartPolicy"), "procman.policy"),
    **dict.fromkeys(
        (
            "HealthSettings",
            "LogSettings",
            "RestartSettings",
            "ServerSpec",
            "default_name",
            "parse_gpu_layers",
            "resolve_model",
        ),
        "procman.spec",
    ),
    **dict.fromkeys(("ServeRequest", "ServerInfo"), "procman._request"),
    **dict.fromkeys(("DaemonClient", "DaemonStatus", "connect"), "procman.client"),
    **dict.fromkeys(("ModelInfo", "validate_model"), "procman.model_file"),
    **dict.fromkeys(("Router", "RouterSettings"), "procman.router"),
    "ManagedServer": "procman.server",
    "Supervisor": "procman._sync",
}
#: public names that differ from the attribute they stand for
_RENAMED = {"AsyncSupervisor": ("procman.supervisor", "Supervisor")}


def __getattr__(name: str) -> Any:
    module, attribute = _RENAMED.get(name) or (_LAZY.get(name, ""), name)
    if not module:
        raise AttributeError(f"module 'procman' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
