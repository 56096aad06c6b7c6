"""``llamactl ps``, ``stop``, ``load`` and ``reload``: talk to a running router's admin API.

They reach the router over HTTP (``--url``, else ``$LLAMACTL_URL``, else
http://127.0.0.1:8080) with ``$LLAMACTL_API_KEY`` as the bearer key, so they
work the same against a router on this machine or another one. Plain
:mod:`urllib`: one short request does not need an event loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from buildtools.errors import LlamactlError
from procman._units import format_bytes
from procman.cli._app import app, console, out

if TYPE_CHECKING:
    from collections.abc import Iterator
    from http.client import HTTPResponse

    from rich.table import Table

__all__ = ["Url", "load", "open_admin", "ps", "reload", "stop"]

DEFAULT_URL = "http://127.0.0.1:8080"

Url = Annotated[
    str | None,
    typer.Option(help=f"The router ($LLAMACTL_URL, default {DEFAULT_URL}).", show_default=False),
]


def _call(url: str | None, method: str, path: str, timeout: float = 10.0) -> Any:
    with open_admin(url, method, path, timeout) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def open_admin(
    url: str | None, method: str, path: str, timeout: float = 10.0
) -> Iterator[HTTPResponse]:
    """The router's answer to ``method path``, open; errors become :class:`LlamactlError`."""
    base = (url or os.environ.get("LLAMACTL_URL") or DEFAULT_URL).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise LlamactlError(f"the router URL must be http(s)://..., got {base!r}")
    body = b"" if method == "POST" else None
    request = urllib.request.Request(f"{base}{path}", method=method, data=body)  # noqa: S310 - checked above
    if key := os.environ.get("LLAMACTL_API_KEY"):
        request.add_header("Authorization", f"Bearer {key}")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - checked above
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code}"
        hint = "set LLAMACTL_API_KEY to the router's key" if exc.code == 401 else None
        raise LlamactlError(f"{base}: {message}", hint=hint) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise LlamactlError(
            f"no llamactl router answers at {base} ({getattr(exc, 'reason', exc)})",
            hint="start one with `llamactl serve --config models.toml`, or pass --url",
        ) from exc
    with response:
        yield response


def _size(value: int | None) -> str:
    return format_bytes(value)


def _number(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.0f}{unit}"


def _table(models: list[dict[str, Any]]) -> Table:
    from rich.table import Table  # speed

    table = Table(
        "name", "state", "pid", "port", "rss", "cpu", "vram", "tok/s", "restarts", "queue", "model"
    )
    for row in models:
        queue = row.get("queue") or {}
        busy = f"{queue.get('active', 0)}+{queue.get('waiting', 0)}" if queue else "-"
        table.add_row(
            escape(row["name"]), escape(row.get("pulling") or row["state"]), str(row["pid"] or "-"),
            str(row["port"] or "-"), _size(row["rss_bytes"]),
            _number(row.get("cpu_percent"), "%"), _size(row.get("vram_bytes")),
            _number(row.get("tokens_per_second")), str(row["restarts"]), busy,
            escape(row["model"]) + _workers(row.get("rpc_workers") or [])
            + _devices(row.get("devices") or []),
        )  # fmt: skip
    return table


def _devices(devices: list[dict[str, Any]]) -> str:
    """The GPUs a server was placed on, under its model: what NVML measured there, and
    what its admission reserved."""
    return "".join(
        f"\n  GPU {d['index'] if d['index'] is not None else '?'} {escape(d['uuid'])} "
        f"{_size(d['vram_bytes'])} (reserved {_size(d['reserved_bytes'])})"
        for d in devices
    )


def _workers(workers: list[dict[str, Any]]) -> str:
    """An RPC group's workers under its model: each endpoint, up or down, times lost."""
    marks = {True: "[green]up[/]", False: "[red]down[/]", None: "?"}
    return "".join(
        f"\n  rpc {escape(w['endpoint'])} {marks[w['up']]}"
        + (f" (lost {w['lost']}x)" if w["lost"] else "")
        for w in workers
    )


def _remote_table(remote: list[dict[str, Any]]) -> Table:
    """Models served by replicas: each replica's state, in flight, ejections, cache hits."""
    from rich.table import Table  # speed

    table = Table("remote", "pick", "replica", "state", "in flight", "requests", "ejections",
                  "cache hits", "last error")  # fmt: skip
    colour = {"up": "green", "ejected": "red"}
    for row in remote:
        for r in row["replicas"]:
            hits = "-" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.0f}%"
            table.add_row(
                escape(row["name"]), row["pick"], escape(r["url"]),
                f"[{colour[r['state']]}]{r['state']}[/]", str(r["in_flight"]),
                str(r["requests"]), str(r["ejections"]), hits, escape(r["last_error"]),
            )  # fmt: skip
    return table


@app.command()
def ps(
    *,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list on stdout.")] = False,
    watch: Annotated[
        float | None,
        typer.Option(help="Refresh the table every N seconds until Ctrl-C.", min=0.2),
    ] = None,
    url: Url = None,
) -> None:
    """List the router's models: state, pid, port, memory, CPU, VRAM, speed, restarts, queue.

    CPU, VRAM and tokens per second are the router's last sample (every few
    seconds; tokens per second only for servers run with ``--metrics``).
    """
    status = _call(url, "GET", "/admin/status")
    models: list[dict[str, Any]] = status["models"]
    if as_json:
        out.print_json(json.dumps(models + status.get("remote", [])))
        return
    if watch is None:
        out.print(_table(models))
        if status.get("remote"):
            out.print(_remote_table(status["remote"]))
        return
    import time  # speed

    from rich.live import Live  # speed

    with contextlib.suppress(KeyboardInterrupt), Live(_table(models), console=out) as live:
        while True:
            time.sleep(watch)  # a terminal refresh, not a wait on the router's state
            live.update(_table(_call(url, "GET", "/admin/status")["models"]))


@app.command()
def stop(
    name: Annotated[str | None, typer.Argument(help="The model to stop.")] = None,
    *,
    all_models: Annotated[bool, typer.Option("--all", help="Stop every model.")] = False,
    url: Url = None,
) -> None:
    """Stop (unload) a model in the running router; it starts again on its next request."""
    if (name is None) == (not all_models):
        raise LlamactlError("pass a model NAME or --all")
    _call(url, "POST", "/admin/unload" if all_models else f"/admin/unload/{name}", timeout=60)
    console.print(f"stopped {'every model' if all_models else escape(str(name))}")


@app.command()
def load(
    name: Annotated[str, typer.Argument(help="The model to load.")],
    *,
    url: Url = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for it to be ready.")] = 300,
) -> None:
    """Start a model in the running router now, and wait until it is ready."""
    rows = _call(url, "POST", f"/admin/load/{name}", timeout=timeout)["models"]
    state = rows[0]["state"] if rows else "?"
    console.print(f"{escape(name)}: {escape(state)}")


@app.command()
def reload(
    *,
    url: Url = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait (removed and restarted models drain first).")
    ] = 600,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Make the running `serve --config` read its file again and apply the changes.

    Unchanged models keep running untouched; added ones are served; removed
    ones finish their requests and stop; changed ones restart only if a
    setting of llama-server's changed (ctx, args, path...). A wrong file
    changes nothing and the error says where. SIGHUP does the same.
    """
    report = _call(url, "POST", "/admin/reload", timeout=timeout)
    if as_json:
        out.print_json(json.dumps(report))
        return
    console.print(f"[bold]{escape(report['summary'])}[/]")
    for model in report["models"]:
        changes = ", ".join(change["text"] for change in model["changes"])
        style = "" if model["ok"] else "[bold red]"
        line = f"{model['name']}: {changes + ': ' if changes else ''}{model['detail']}"
        console.print(f"  {style}{escape(line)}")
    if not report["ok"]:
        raise LlamactlError("a model failed to restart with its new settings", hint="llamactl ps")
