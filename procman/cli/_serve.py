"""``llamactl serve``.

``serve`` checks everything it can before spawning anything (the model file,
exposure without a key, the public port, the server binary), binds the
public port (early clients wait in its backlog), spawns the supervised
llama-server, and imports and starts the router while the model loads
(requests then wait for readiness). Ctrl-C or SIGTERM stops the router,
then the server (SIGTERM, grace, SIGKILL of its process group).

``serve --config models.toml`` is :mod:`procman.cli._serve_config`.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from buildtools.errors import LlamactlError
from procman._loop import run as run_loop
from procman.cli._app import app, console, out
from procman.cli._logfmt import OUTPUT, LogFormat
from procman.cli._progress import BuildProgressView
from procman.cli._rpc import checked_rpc, rpc_fields
from procman.cli._serve_config import serve_config
from procman.cli._serving import (
    catch_signals,
    chosen_key,
    forget_signals,
    print_budget,
    print_event,
    url,
)
from procman.errors import AdmissionError, ServerError
from procman.process import _early

if TYPE_CHECKING:
    from procman.events import Event
    from procman.spec import ServerSpec
    from procman.supervisor import AsyncSupervisor

__all__ = ["serve"]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    context: typer.Context,
    model: Annotated[
        str | None,
        typer.Argument(help="A .gguf path or a model name in the cache; default: the demo model."),
    ] = None,
    *,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Serve the models a TOML file declares (on demand)."),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Interface of the public endpoint [default: 127.0.0.1].")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port of the public endpoint [default: 8080].")
    ] = None,
    ctx_size: Annotated[
        int | None, typer.Option("--ctx", help="Context size (default: llama-server's).")
    ] = None,
    parallel: Annotated[
        int | None, typer.Option(help="Requests served concurrently (slots).")
    ] = None,
    gpu_layers: Annotated[
        str | None, typer.Option(help="Layers on the GPU: N, auto or all.")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="LLAMACTL_API_KEY",
            help="Require 'Authorization: Bearer KEY' (prefer --api-key-file or the variable: "
            "arguments show in `ps`).",
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(envvar="LLAMACTL_API_KEY_FILE", help="Read the API key from this file."),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="Also answer requests whose Host is NAME (repeatable; .lan: a domain and its "
            "subdomains; *: any). Others get 403 (DNS rebinding).",
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--cors-origin",
            help="Let web pages at ORIGIN call the API, e.g. http://localhost:3000 (repeatable).",
        ),
    ] = None,
    server: Annotated[Path | None, typer.Option(help="The llama-server binary to run.")] = None,
    name: Annotated[
        str | None, typer.Option(help="Model name for clients and the log file.")
    ] = None,
    startup_timeout: Annotated[
        float, typer.Option(help="Seconds the model may take to load.")
    ] = 120.0,
    daemon: Annotated[
        bool,
        typer.Option(
            "--daemon",
            help="Have the shared daemon (started if none runs) serve MODEL; print its URL "
            "and its API key, one per line.",
        ),
    ] = False,
    insecure: Annotated[
        bool, typer.Option(help="Allow a non-loopback --host without --api-key.")
    ] = False,
    rpc: Annotated[
        str | None,
        typer.Option(
            help="Split the model across RPC workers (`llamactl worker`): HOST:PORT,HOST:PORT."
        ),
    ] = None,
    tensor_split: Annotated[
        str | None,
        typer.Option(
            help="With --rpc: each device's share of the layers, e.g. 1,3 (llama.cpp's device "
            "order: RPC workers, then local GPUs); auto: from `llamactl estimate --rpc`."
        ),
    ] = None,
    trusted_network: Annotated[
        bool,
        typer.Option(
            "--trusted-network",
            help="Allow RPC workers beyond loopback (RPC has no authentication).",
        ),
    ] = False,
    stall_timeout: Annotated[
        float, typer.Option(help="With --rpc: seconds before a stalled group is restarted.")
    ] = 30.0,
    watch: Annotated[
        bool, typer.Option("--watch", help="With --config: reload the file when it changes.")
    ] = False,
    log_format: Annotated[
        LogFormat,
        typer.Option(
            "--log-format",
            envvar="LLAMACTL_LOG_FORMAT",
            help="llamactl's own log on stderr: text, or json (one object per line).",
        ),
    ] = LogFormat.TEXT,
) -> None:
    """Serve a GGUF model at HOST:PORT (OpenAI-compatible) under supervision.

    Extra llama-server arguments go after '--': `llamactl serve m.gguf -- --flash-attn on`.
    """
    import buildtools  # speed
    from procman.models.gguf import validate_model  # speed
    from procman.models.refs import default_name  # speed
    from procman.router.listen import bind_listener, check_exposure  # speed
    from procman.spec import ServerSpec, parse_gpu_layers  # speed

    if config is not None or daemon:
        _early.discard()  # nothing to adopt it
    OUTPUT.configure(log_format)
    if watch and config is None:
        raise LlamactlError("--watch reloads a config file: pass --config FILE with it")
    extra = list(context.args)
    if model is not None and model.startswith("-"):  # `serve -- -fa on`: click gives -fa to MODEL
        extra.insert(0, model)
        model = None
    # what the command line (or the environment, through typer) says of the endpoint
    given: dict[str, Any] = {
        "host": host, "port": port, "api_key": api_key,
        "api_key_file": str(api_key_file) if api_key_file else None,
        "allowed_hosts": tuple(allowed_host) if allowed_host else None,
        "cors_origins": tuple(cors_origin) if cors_origin else None,
    }  # fmt: skip
    if config is not None:
        if model is not None or extra:
            raise LlamactlError(
                "--config declares the models: pass no MODEL or extra arguments with it",
                hint="put per-model llama-server arguments in the file's `args`",
            )
        serve_config(config, given, binary=server, insecure=insecure, watch=watch)
        return
    if daemon:
        _serve_via_daemon(
            model,
            name=name,
            ctx=ctx_size,
            parallel=parallel,
            gpu_layers=gpu_layers,
            args=extra,
            binary=server,
            startup_timeout=startup_timeout,
        )
        return
    # (no ServerSection here: procman.config costs ~10 ms on the way to the first spawn)
    host, port = host or "127.0.0.1", 8080 if port is None else port
    access: dict[str, Any] = {
        "api_key": chosen_key(api_key, given["api_key_file"]),
        "allowed_hosts": given["allowed_hosts"] or (),
        "cors_origins": given["cors_origins"] or (),
    }
    layers = parse_gpu_layers(gpu_layers)
    check_exposure(host, access["api_key"], allow_unauthenticated=insecure)
    rpc = checked_rpc(rpc, trusted=trusted_network)  # before anything is fetched or built
    model_path = _model_path(model)
    info = validate_model(model_path)
    with BuildProgressView(
        "no llama-server is built for this machine yet: building and verifying one "
        "(about 10 minutes on 2 cores, once; `llamactl build` does the same)"
    ) as view:
        resolved = buildtools.resolve_server(server, build_if_missing=True, on_progress=view)
    group = rpc_fields(resolved, rpc, tensor_split, info, ctx_size, parallel, stall_timeout)
    server_name = name or default_name(model_path, model)
    stem = model_path.name.removesuffix(".gguf")
    spec = ServerSpec(
        name=server_name,
        aliases=() if stem == server_name else (stem,),
        model=model_path,
        binary=resolved.binary,
        ctx=ctx_size,
        parallel=parallel,
        gpu_layers=layers,
        extra_args=tuple(extra),
        startup_timeout=startup_timeout,
        **group,
    )
    listener = bind_listener(host, port)  # the last check; the port stays ours from here on
    with listener:
        size = f"{info.size_bytes / 1e6:.0f} MB"
        kind = f"{info.architecture}, {info.file_type or '?'}, {size}"
        line = f"[bold]{escape(spec.name)}[/]: {escape(str(model_path))} ({escape(kind)})"
        OUTPUT.say("model", line)
        binary, why = escape(str(resolved.binary)), escape(resolved.reason)
        OUTPUT.say("binary", f"[dim]llama-server:[/] {binary} [dim]({why})[/]")
        try:
            failure = run_loop(_serve(spec, listener, access))
        finally:
            _early.discard()  # unless adopted: the start may have ended before its spawn
    if failure is not None:
        raise ServerError(failure.reason, log_tail=failure.log_tail, hint=f"log: {spec.log_path}")


def _model_path(model: str | None) -> Path:
    """The model's file; an ``hf:`` reference not in the cache yet is pulled, with progress."""
    from procman.models.refs import resolve_model  # speed

    if model is not None and model.startswith("hf:"):
        from procman.cli._models import PullView  # speed

        with PullView() as view:
            return resolve_model(model, on_progress=view)
    return resolve_model(model)


def _serve_via_daemon(
    model: str | None,
    *,
    name: str | None,
    ctx: int | None,
    parallel: int | None,
    gpu_layers: str | None,
    args: list[str],
    binary: Path | None,
    startup_timeout: float,
) -> None:
    """The daemon owns the server (shared with other clients until idle); we only ask."""
    import procman  # speed
    from procman.spec import parse_gpu_layers  # speed

    with procman.connect() as client:
        info = client.serve(
            model or "demo",
            name=name,
            ctx=ctx,
            parallel=parallel,
            gpu_layers=parse_gpu_layers(gpu_layers),
            args=args,
            binary=str(binary) if binary else None,
            startup_timeout=startup_timeout,
        )
    console.print(
        f"[bold green]ready[/]: model [bold]{escape(info.name)}[/] at [bold]{info.base_url}[/] "
        f"[dim](served by the shared daemon, pid {info.pid}; `llamactl daemon --stop` ends it; "
        "the second line is the server's own API key: other local users cannot call it)[/]"
    )
    out.print(info.base_url)
    out.print(info.api_key or "")


async def _serve(spec: ServerSpec, listener: socket.socket, access: dict[str, Any]) -> Event | None:
    """Run until Ctrl-C/SIGTERM (returns None), or until the first start fails (its event).

    Once the model has been ready, serve stays up whatever happens to it: an
    unloaded model (admin API) starts again on the next request, and one
    failed by its crashes after its cooldown (see :mod:`procman.process.policy`).
    """
    from procman.supervisor import AsyncSupervisor  # speed

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    catch_signals(loop, stop.set)
    watch = _FirstStart(loop)
    failed, spawned = watch.failed, watch.spawned
    supervisor = AsyncSupervisor()
    supervisor.bus.subscribe(watch)
    # since `llamactl serve` was launched: the early start began before this function
    started = _early.launched_at() or time.monotonic()
    router = None
    record = _LaunchRecord(supervisor, spec.name, listener)
    try:
        # validated before the port was bound; the early server (if any) is adopted only
        # if it runs exactly what the checks below decide
        # on demand: a stopped or (after its cooldown) failed model starts at the next request
        supervisor.add(spec, validate=False, on_demand=True).offer(_early.take())
        # through the supervisor: the -ngl choice (printed as an event) and admission
        starting = asyncio.ensure_future(supervisor.load(spec.name))
        # The model loads while the router is imported and started (~150 ms of
        # aiohttp): clients already connect to the bound listener and wait in
        # its backlog, so nothing is refused meanwhile.
        stopping = asyncio.ensure_future(stop.wait())
        first: set[asyncio.Future[Any]] = {starting, spawned, stopping}
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        from procman.router import Router, RouterSettings  # speed

        print_budget(supervisor)
        router = Router(supervisor, RouterSettings(**access))
        from procman.router._logs import Journal  # speed

        router.journal = Journal()
        OUTPUT.attach(router.journal)
        await router.start(listener)  # from now on requests wait for the model, never refused
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()  # kills and reaps the half-started server
            await asyncio.wait({starting})
        elif isinstance(refused := starting.exception(), AdmissionError):
            raise refused  # `main` prints it with its numbers and exits 1
        elif starting.exception() is None:
            record.arm(loop)
            OUTPUT.say(
                "serving",
                f"[bold green]ready[/] in {time.monotonic() - started:.1f} s: "
                f"model [bold]{escape(spec.name)}[/] at [bold]{url(router)}[/]  "
                f"[dim](dashboard {url(router, '/ui')}; Ctrl-C stops)[/]",
            )
            await stopping
        stopping.cancel()
    finally:
        record.flush()
        if router is not None:
            await router.stop()
        await supervisor.stop()
        forget_signals(loop)
    if failed.done():
        return failed.result()
    OUTPUT.say("stopped", "stopped")
    return None


class _FirstStart:
    """Prints the events; ``failed`` only if the model never got ready (then serve ends)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.failed: asyncio.Future[Event] = loop.create_future()
        self.spawned: asyncio.Future[None] = loop.create_future()
        self.ready = False

    def __call__(self, event: Event) -> None:
        from procman.events import State  # speed

        print_event(event)
        if event.is_note:  # an admission, an eviction: no change of state
            return
        self.ready = self.ready or event.state is State.READY
        if event.state in {State.STARTING, State.FAILED} and not self.spawned.done():
            self.spawned.set_result(None)
        if event.state is State.FAILED and not self.failed.done() and not self.ready:
            self.failed.set_result(event)


class _LaunchRecord:
    """What was spawned, recorded for the next identical `serve` to start early
    (procman.process._early).

    Written a second after the server is ready, off the way of the first
    requests (it is file I/O in the event loop), or when stopping if sooner.
    """

    def __init__(self, supervisor: AsyncSupervisor, name: str, listener: socket.socket) -> None:
        self._supervisor = supervisor
        self._name = name
        self._listener = listener
        self._timer: asyncio.TimerHandle | None = None

    def arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = loop.call_later(1.0, self.flush)

    def flush(self) -> None:
        if self._timer is None:
            return
        self._timer.cancel()
        self._timer = None
        self._write()

    def _write(self) -> None:
        from procman.memory._limits import is_cuda_build  # speed
        from procman.memory.budget import host_margin  # speed

        supervisor = self._supervisor
        server = supervisor.servers[self._name]
        held = supervisor.limits.ledger.held().get(self._name)
        endpoint = server.endpoint
        if endpoint is None or held is None or self._listener.fileno() < 0:
            return  # stopped meanwhile
        if endpoint.socket is None:
            return  # a keyed TCP server is not started early: its key file is per life
        if server.spec.rpc:
            return  # an RPC group starts only after its workers answer (ManagedServer)
        public = self._listener.getsockname()
        _early.remember(
            argv=server.spec.argv(endpoint),
            socket=endpoint.socket,
            model=str(server.spec.model),
            binary=str(server.spec.binary),
            public=(str(public[0]), int(public[1])),
            min_available=held[0] + host_margin(supervisor.limits.machine.total_bytes),
            cuda=is_cuda_build(server.spec.binary),
        )
