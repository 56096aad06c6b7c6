"""Run GGUF models under llama-server, supervised, behind one OpenAI-compatible endpoint.

The library a desktop app embeds and the ``llamactl`` CLI drives. Blocking::

    with procman.Supervisor() as sup:              # owns its servers; they end with it
        sup.on_event(print)                        # state changes (called from its loop thread)
        server = sup.serve("model.gguf", ctx=2048) # returns when ready
        server.base_url                            # http://127.0.0.1:PORT/v1

    with procman.connect() as client:              # the shared daemon, started if none runs
        server = client.serve("demo")

In a GUI: ``procman.prepare(model, on_progress=...)`` compiles the server on a
first run, cancellably, in the background; ``procman.Inbox`` hands callbacks
from the library's threads to the GUI thread (see examples/desktop/).

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

from procman._lazy import exports

#: typing costs ~8 ms to import, paid by every `llamactl` run (the entry point is in this
#: package); mypy treats this name as typing.TYPE_CHECKING
TYPE_CHECKING = False
if TYPE_CHECKING:
    from buildtools.errors import BuildCancelled
    from procman.daemon import (
        DaemonClient,
        DaemonStatus,
        ServeRequest,
        ServerInfo,
        Supervisor,
        connect,
    )
    from procman.daemon._inbox import Inbox
    from procman.daemon._prepare import Preparation, Prepared, Progress, prepare
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
    from procman.models import ModelInfo, default_name, resolve_model, validate_model
    from procman.process import (
        Action,
        Decision,
        ManagedServer,
        RestartPolicy,
        follow,
        log_path,
        read_tail,
    )
    from procman.process._sockets import pick_free_port
    from procman.router import Router, RouterSettings, bind_listener, check_exposure
    from procman.spec import (
        HealthSettings,
        LogSettings,
        RestartSettings,
        ServerSpec,
        parse_gpu_layers,
    )
    from procman.supervisor import AsyncSupervisor

__all__ = [
    "Action",
    "AdmissionError",
    "AsyncSupervisor",
    "BuildCancelled",
    "ConfigError",
    "DaemonClient",
    "DaemonError",
    "DaemonStatus",
    "Decision",
    "Event",
    "EventBus",
    "HealthSettings",
    "Inbox",
    "LlamactlError",
    "LogSettings",
    "ManagedServer",
    "ModelError",
    "ModelInfo",
    "PortInUseError",
    "Preparation",
    "Prepared",
    "Progress",
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
    "prepare",
    "read_tail",
    "resolve_model",
    "validate_model",
]

#: every public name -> the module that defines it, imported on first use: ``import procman``
#: (and so the ``llamactl`` entry point, which lives in this package) costs nothing
__getattr__, __dir__ = exports(
    __name__,
    {
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
        **dict.fromkeys(("follow", "log_path", "read_tail"), "procman.process.logs"),
        **dict.fromkeys(("Action", "Decision", "RestartPolicy"), "procman.process.policy"),
        "ManagedServer": "procman.process.server",
        "pick_free_port": "procman.process._sockets",
        **dict.fromkeys(
            ("HealthSettings", "LogSettings", "RestartSettings", "ServerSpec", "parse_gpu_layers"),
            "procman.spec",
        ),
        **dict.fromkeys(("default_name", "resolve_model"), "procman.models.refs"),
        "ModelInfo": "procman.models.info",
        "validate_model": "procman.models.gguf",
        **dict.fromkeys(("ServeRequest", "ServerInfo"), "procman.daemon._request"),
        **dict.fromkeys(("DaemonClient", "DaemonStatus", "connect"), "procman.daemon.client"),
        "Supervisor": "procman.daemon._sync",
        "Inbox": "procman.daemon._inbox",
        **dict.fromkeys(
            ("Preparation", "Prepared", "Progress", "prepare"), "procman.daemon._prepare"
        ),
        "BuildCancelled": "buildtools.errors",
        **dict.fromkeys(("Router", "RouterSettings"), "procman.router._router"),
        **dict.fromkeys(("bind_listener", "check_exposure"), "procman.router.listen"),
        "AsyncSupervisor": "procman.supervisor",
    },
)
