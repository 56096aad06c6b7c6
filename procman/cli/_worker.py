"""``llamactl worker`` (lend this machine's devices to a llama-server elsewhere) and
``llamactl workers`` (what each worker endpoint answers)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from buildtools.errors import LlamactlError
from procman._loop import run as run_loop
from procman._units import format_bytes
from procman.cli._app import app, console, out

if TYPE_CHECKING:
    from procman.distributed.worker import ManagedWorker

__all__ = ["worker", "workers"]


@app.command()
def worker(
    host: Annotated[
        str, typer.Option(help="IPv4 address to listen on; non-loopback needs --allow-network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="RPC port leaders connect to.")] = 50052,
    device: Annotated[
        list[str] | None,
        typer.Option(
            "--device", "-d", help="Device to lend, e.g. CUDA0 (repeatable; default all)."
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", "-t", help="CPU threads for the CPU device.")
    ] = None,
    cache: Annotated[
        bool, typer.Option("--cache", help="Keep large tensors in a local file cache.")
    ] = False,
    allow_network: Annotated[
        bool,
        typer.Option(
            "--allow-network",
            help="Listen on a non-loopback address. RPC has no authentication: only on a "
            "network you trust.",
        ),
    ] = False,
    status_port: Annotated[
        int | None,
        typer.Option(help="Port of the read-only status endpoint [default: PORT + 1]; 0: none."),
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            envvar="LLAMACTL_API_KEY_FILE", help="Require this key on the status endpoint."
        ),
    ] = None,
    server: Annotated[Path | None, typer.Option(help="The ggml-rpc-server binary to run.")] = None,
) -> None:
    """Lend this machine's devices to a llama-server elsewhere: a supervised ggml-rpc-server.

    Then, on the leader: `llamactl serve MODEL --rpc THIS_HOST:PORT`.
    """
    import buildtools  # speed
    from procman.cli._progress import BuildProgressView  # speed
    from procman.distributed.status import STATUS_PORT_OFFSET  # speed
    from procman.distributed.worker import WorkerSpec, check_listen, port_free  # speed
    from procman.errors import PortInUseError  # speed

    check_listen(host, port, allow_network=allow_network)  # before anything is built or run
    key = None
    if api_key_file is not None:
        from procman.config import read_key_file  # speed

        key = read_key_file(api_key_file)
    with BuildProgressView(
        "no ggml-rpc-server is built for this machine yet: building and verifying one "
        "(about 10 minutes on 2 cores, once)"
    ) as view:
        resolved = buildtools.resolve_worker(server, build_if_missing=True, on_progress=view)
    spec = WorkerSpec(
        binary=resolved.binary,
        host=host,
        port=port,
        devices=tuple(device or ()),
        threads=threads,
        cache=cache,
        allow_network=allow_network,
    )
    status = port + STATUS_PORT_OFFSET if status_port is None else status_port
    if status and not port_free(host, status):
        raise PortInUseError(host, status)
    if allow_network:
        console.print(
            f"[yellow]warning:[/] the RPC port {escape(spec.endpoint)} has no authentication: "
            "anyone who reaches it can use this machine's devices"
        )
    version = resolved.build.version if resolved.build is not None else "unknown"
    failed = run_loop(_run_worker(spec, status, version, key))
    if failed:
        raise LlamactlError(failed, hint=f"log: {spec.log.path_for(spec.label)}")


async def _run_worker(spec: Any, status_port: int, version: str, key: str | None) -> str:
    """Run until Ctrl-C/SIGTERM (""), or until the worker fails (why)."""
    import signal  # speed

    from aiohttp import web  # speed

    from procman.distributed.status import status_app  # speed
    from procman.distributed.worker import ManagedWorker  # speed
    from procman.events import State  # speed

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    managed = ManagedWorker(spec)
    managed.bus.subscribe(
        lambda e: console.print(f"{escape(e.server)} [cyan]{e.state}[/] [dim]{escape(e.reason)}[/]")
    )
    runner = None
    try:
        await managed.start()
        if status_port:
            runner = web.AppRunner(
                status_app(managed, version=version, api_key=key, host=spec.host),
                access_log=None,
            )
            await runner.setup()
            await web.TCPSite(runner, spec.host, status_port).start()
        _print_ready(managed, status_port)
        ended = asyncio.ensure_future(managed.wait())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({ended, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if managed.state is State.FAILED:
            return f"the worker failed: {managed.last_reason}"
        return ""
    finally:
        if runner is not None:
            await runner.cleanup()
        await managed.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _print_ready(managed: ManagedWorker, status_port: int) -> None:
    devices = ", ".join(
        f"{d['name']} ({format_bytes(d['free'])} free of {format_bytes(d['total'])})"
        for d in managed.status.devices
    )
    console.print(
        f"[bold green]worker ready[/]: ggml-rpc-server at [bold]{escape(managed.spec.endpoint)}"
        f"[/] (protocol {managed.status.protocol or '?'}; {escape(devices) or 'devices: ?'})"
    )
    if status_port:
        console.print(f"[dim]status:[/] http://{managed.spec.host}:{status_port}/status")
    console.print(
        f"[dim]use it:[/] llamactl serve MODEL --rpc {escape(managed.spec.endpoint)}  "
        "[dim](Ctrl-C stops)[/]"
    )


@app.command()
def workers(
    endpoints: Annotated[list[str], typer.Argument(help="Workers as HOST:PORT.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each answer.")] = 3.0,
) -> None:
    """What each RPC worker answers: reachable, protocol, devices, free memory, busy.

    Exits 1 if any of them cannot take a leader now.
    """
    from procman.distributed.rpc import parse_endpoints  # speed

    listed = parse_endpoints(endpoints)
    reports = run_loop(_survey(listed, timeout))
    if as_json:
        out.print_json(json.dumps(reports))
    else:
        _print_reports(reports)
    if not all(r["usable"] for r in reports):
        raise typer.Exit(1)


async def _survey(endpoints: tuple[str, ...], timeout: float) -> list[dict[str, Any]]:  # noqa: ASYNC109
    return list(await asyncio.gather(*(_report(e, timeout) for e in endpoints)))


async def _report(endpoint: str, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
    """The status endpoint when one answers (it knows a busy worker from a silent one),
    and the RPC port itself unless a leader holds it."""
    from procman.distributed.rpc import parse_endpoint, probe  # speed
    from procman.distributed.status import STATUS_PORT_OFFSET  # speed

    host, port = parse_endpoint(endpoint)
    status = await _status(f"http://{host}:{port + STATUS_PORT_OFFSET}/status", timeout)
    report: dict[str, Any] = {"endpoint": endpoint, "status_endpoint": status is not None}
    if status is not None and status.get("busy"):
        report.update(
            reachable=True,
            protocol=status.get("protocol"),
            devices=status.get("devices", []),
            busy=True,
            usable=False,
            error="busy: a leader is connected (a worker serves one leader at a time)",
        )
        return report
    found = await probe(endpoint, timeout=timeout)
    named = dict(enumerate((status or {}).get("devices", [])))
    report.update(
        reachable=found.reachable,
        protocol=".".join(map(str, found.protocol)) if found.protocol else None,
        devices=[
            {
                "name": named.get(d.index, {}).get("name", f"device {d.index}"),
                "free": d.free,
                "total": d.total,
            }
            for d in found.devices
        ],
        busy=False if status is not None else None,
        usable=found.usable,
        error=found.error,
    )
    return report


async def _status(url: str, timeout: float) -> dict[str, Any] | None:  # noqa: ASYNC109
    import aiohttp  # speed

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url) as resp,
        ):
            if resp.status != 200:
                return None
            doc = await resp.json()
            return doc if isinstance(doc, dict) else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


def _print_reports(reports: list[dict[str, Any]]) -> None:
    table = Table(box=None, header_style="bold")
    for column in ("worker", "answers", "protocol", "devices (free / total)", "busy"):
        table.add_column(column)
    for r in reports:
        answers = "[green]yes[/]" if r["usable"] else f"[red]no[/] [dim]{escape(r['error'])}[/]"
        devices = "\n".join(
            f"{escape(d['name'])}: {format_bytes(d['free'])} / {format_bytes(d['total'])}"
            for d in r["devices"]
        )
        busy = {True: "yes", False: "no", None: "?"}[r["busy"]]
        table.add_row(r["endpoint"], answers, r["protocol"] or "-", devices or "-", busy)
    out.print(table)
