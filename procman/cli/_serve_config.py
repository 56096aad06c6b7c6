"""``llamactl serve --config models.toml``: every model the file declares behind one endpoint.

Each model starts on its first request (see :mod:`procman.config`); flags
given on the command line override the file's ``[server]`` values, and
``LLAMACTL_API_KEY`` overrides both. The file is read once at launch and
again at each reload (:mod:`procman.cli._live`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from procman._loop import run as run_loop
from procman.cli._app import console
from procman.cli._logfmt import OUTPUT
from procman.cli._progress import BuildProgressView
from procman.cli._serving import (
    catch_signals,
    chosen_key,
    forget_signals,
    print_budget,
    print_event,
    url,
)

if TYPE_CHECKING:
    import socket
    from collections.abc import Mapping

    from procman.cli._live import LiveConfig
    from procman.config import ServePlan, ServerSection
    from procman.distributed.remote import RemoteSection
    from procman.supervisor import Fetch

__all__ = ["serve_config"]


def _override(section: ServerSection, given: dict[str, Any]) -> ServerSection:
    """``section`` with what the command line gave: CLI/env over the file, applied here only."""
    chosen = {key: value for key, value in given.items() if value is not None}
    if "api_key" in chosen or "api_key_file" in chosen:  # a key given replaces the file's
        chosen.setdefault("api_key", None)
        chosen.setdefault("api_key_file", None)
    return dataclasses.replace(section, **chosen)


def serve_config(
    path: Path, given: dict[str, Any], *, binary: Path | None, insecure: bool, watch: bool
) -> None:
    """``serve --config``: validate everything, bind, then serve until Ctrl-C."""
    import buildtools  # speed
    from procman.cli._live import LiveConfig  # speed
    from procman.models.gguf import validate_model  # speed
    from procman.reload._read import read_config  # speed
    from procman.reload.apply import Loaded  # speed
    from procman.router.listen import bind_listener, check_exposure  # speed

    def load() -> Loaded:  # at launch, and again at each reload
        loaded = read_config(path)
        section = _override(loaded.server, given)
        section = dataclasses.replace(
            section, api_key=chosen_key(section.api_key, section.api_key_file)
        )
        loaded = dataclasses.replace(loaded, server=section)
        check_exposure(section.host, section.api_key, allow_unauthenticated=insecure)
        # only [remote.NAME] models: this machine runs no llama-server
        server = resolved.binary if resolved is not None else Path("llama-server")
        return Loaded(config=loaded, plan=loaded.plan(server))

    first = read_config(path)  # a wrong file is reported before any build
    for warning in first.warnings():
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    resolved = None
    if first.models:
        with BuildProgressView(
            "no llama-server is built for this machine yet: building and verifying one "
            "(about 10 minutes on 2 cores, once; `llamactl build` does the same)"
        ) as view:
            resolved = buildtools.resolve_server(binary, build_if_missing=True, on_progress=view)
    current = load()
    plan, section = current.plan, current.config.server
    for name, remote in current.config.remote.items():
        console.print(f"[bold]{escape(name)}[/]: {len(remote.replicas)} replicas, {remote.pick}")
    for model in plan.models:
        if model.pull is not None:
            console.print(
                f"[bold]{escape(model.spec.name)}[/]: {escape(model.pull)} (pulled on first use)"
            )
            continue
        info = validate_model(model.spec.model)
        what = f"{info.architecture}, {info.file_type or '?'}, {info.size_bytes / 1e6:.0f} MB"
        OUTPUT.say(
            "model",
            f"[bold]{escape(model.spec.name)}[/]: {escape(str(model.spec.model))} ({escape(what)})",
        )
    listener = bind_listener(section.host, section.port)
    live = LiveConfig(file=path, load=load, current=current, watch=watch)
    with listener:
        run_loop(_serve_plan(plan, listener, live, current.config.remote))


def _access(section: ServerSection) -> dict[str, Any]:
    """What the router's access rules need of a ``[server]`` table."""
    return {
        "api_key": section.api_key,
        "allowed_hosts": section.allowed_hosts,
        "cors_origins": section.cors_origins,
    }


async def _serve_plan(
    plan: ServePlan,
    listener: socket.socket,
    live: LiveConfig | None = None,
    remote: Mapping[str, RemoteSection] | None = None,
) -> None:
    """Run the router over on-demand servers until Ctrl-C/SIGTERM; a failed model only reports."""
    from procman.cli._live import go_live  # speed
    from procman.router import Router, RouterSettings  # speed
    from procman.router._logs import Journal  # speed
    from procman.router.scheduler import QueueSettings, Scheduler  # speed
    from procman.supervisor import AsyncSupervisor  # speed

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    catch_signals(loop, stop.set)
    supervisor = AsyncSupervisor(
        max_loaded=plan.server.max_loaded,
        memory_budget=plan.server.memory_budget,
        vram_budget=plan.server.vram_budget,
    )
    supervisor.bus.subscribe(print_event)
    print_budget(supervisor)
    scheduler = Scheduler()
    for model in plan.models:
        supervisor.add(
            model.spec, validate=False, ttl=model.ttl, on_demand=True,
            memory_limit=model.memory_limit, fetch=_fetcher(model.pull),
        )  # fmt: skip
        slots = QueueSettings(
            slots=model.spec.parallel or 1, maxsize=model.queue, order=model.order
        )
        scheduler.add(model.spec.name, slots)
    from procman.router.replicas import ReplicaSets  # speed

    replicas = ReplicaSets.configured(remote or {}, scheduler)
    router = Router(
        supervisor, RouterSettings(**_access(plan.server)), scheduler=scheduler, replicas=replicas
    )
    router.journal = Journal()
    OUTPUT.attach(router.journal)
    unwire = None
    try:
        await replicas.start()
        await router.start(listener)
        if live is not None:
            unwire = await go_live(live, supervisor, scheduler, router)
        names = ", ".join([*(m.spec.name for m in plan.models), *(remote or {})])
        reloads = " or SIGHUP reloads the file" if live is not None else ""
        OUTPUT.say(
            "serving",
            f"[bold green]serving[/] {escape(names)} at [bold]{url(router)}[/] "
            f"[dim](dashboard {url(router, '/ui')}; each model starts on its first request; "
            f"`llamactl reload`{reloads}; Ctrl-C stops)[/]",
        )
        await stop.wait()
    finally:
        if unwire is not None:
            await unwire()
        await router.stop()
        await replicas.stop()
        await supervisor.stop()
        forget_signals(loop)
    OUTPUT.say("stopped", "stopped")


def _fetcher(ref: str | None) -> Fetch | None:
    """For a model still to be pulled: the download the supervisor runs at its first load."""
    if ref is None:
        return None
    from procman.models.refs import resolve_model  # speed

    return lambda report: resolve_model(ref, on_progress=report)
