"""``llamactl estimate``: how much memory a model will take before it is started."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from procman._units import format_bytes
from procman.cli._app import app, out
from procman.errors import ConfigError


class FlashAttn(StrEnum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


def _size(n: int) -> str:
    """Binary units with two decimals, as llama.cpp's own logs print them."""
    return "-" if n == 0 else format_bytes(n, digits=2)


@app.command()
def estimate(
    model: Annotated[
        str, typer.Argument(help="a .gguf file, `demo`, or hf:/ollama:/lmstudio: as `models` lists")
    ],
    ctx: Annotated[
        int, typer.Option("--ctx", "-c", help="context over all slots (0 = training context)")
    ] = 0,
    parallel: Annotated[int, typer.Option(help="server slots (llama-server -np)")] = 1,
    gpu_layers: Annotated[
        int, typer.Option(help="layers to offload (-ngl); -1 = all, 0 for a CPU build")
    ] = 0,
    cache_type_k: Annotated[str, typer.Option(help="KV cache type for K")] = "f16",
    cache_type_v: Annotated[str, typer.Option(help="KV cache type for V")] = "f16",
    ubatch: Annotated[int, typer.Option(help="physical batch size (-ub)")] = 512,
    flash_attn: Annotated[FlashAttn, typer.Option(help="flash attention")] = FlashAttn.AUTO,
    kv_unified: Annotated[bool, typer.Option(help="one KV buffer shared by all slots")] = False,
    cache_ram: Annotated[
        int, typer.Option(help="prompt-cache limit in MiB (--cache-ram); counts as growth")
    ] = 0,
    rpc: Annotated[
        str | None,
        typer.Option(help="split across these RPC workers (HOST:PORT,...): per-device plan"),
    ] = None,
    tensor_split: Annotated[
        str | None, typer.Option(help="with --rpc: shares per worker, e.g. 1,3 (default auto)")
    ] = None,
    devices: Annotated[
        str | None,
        typer.Option(
            help="place it on this machine's NVIDIA GPUs as serve would: auto, all, or "
            "indices/UUIDs (0,1): per-GPU totals and -ts"
        ),
    ] = None,
    ctx_checkpoints: Annotated[
        int, typer.Option(help="SWA checkpoints per slot (--ctx-checkpoints); beyond 2: growth")
    ] = 32,
    mmap: Annotated[
        bool, typer.Option(help="--no-mmap for llama-server's --load-mode none")
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="machine-readable output on stdout")
    ] = False,
) -> None:
    """Predict the host RAM and GPU memory llama-server will need for MODEL."""
    from procman.cli._models import PullView  # speed
    from procman.memory.estimate import COMPONENTS  # speed
    from procman.memory.estimate import estimate as run_estimate  # speed
    from procman.models.gguf import validate_model  # speed
    from procman.models.refs import is_store_ref, resolve_model  # speed

    if model == "demo" or is_store_ref(model):
        with PullView() as view:
            path = resolve_model(model, on_progress=view)
    else:
        path = Path(model)  # a plain path is validated (and reported) as given
    info = validate_model(path)
    # what llama-server's flags say of the layout: shared by the single-machine estimate
    # and the split across RPC workers
    layout: dict[str, Any] = {
        "ctx": ctx,
        "parallel": parallel,
        "cache_type_k": cache_type_k,
        "cache_type_v": cache_type_v,
        "n_ubatch": ubatch,
        "flash_attn": {"auto": None, "on": True, "off": False}[flash_attn.value],
        "kv_unified": kv_unified,
    }
    if rpc is not None:
        _print_split(info, rpc, tensor_split, as_json=as_json, **layout)
        return
    if devices is not None:
        layers = info.n_layers + 1 if gpu_layers < 0 else gpu_layers
        _print_placement(info, devices, layers, as_json=as_json, **layout)
        return
    est = run_estimate(
        info,
        gpu_layers=gpu_layers,
        cache_ram=cache_ram * 1024 * 1024,
        ctx_checkpoints=ctx_checkpoints,
        mmap=mmap,
        **layout,
    )
    if as_json:
        doc = est.to_json()
        doc["model"] = {
            "path": str(info.path),
            "architecture": info.architecture,
            "name": info.name,
            "file_type": info.file_type,
            "n_layers": info.n_layers,
            "n_ctx_train": info.n_ctx_train,
        }
        out.print_json(json.dumps(doc))
        return

    s = est.settings
    swa = f", {info.n_swa_layers} sliding-window (window {info.sliding_window})"
    out.print(
        f"[bold]{escape(info.name or info.path.name)}[/] {info.architecture}, "
        f"{info.file_type or '?'}, {info.n_layers} layers"
        f"{swa if info.n_swa_layers else ''}, {_size(info.size_bytes)}"
    )
    out.print(
        f"ctx {s['n_ctx']} ({s['parallel']} slot(s) x {s['n_ctx_seq']}"
        f"{', unified' if s['kv_unified'] and s['parallel'] > 1 else ''}), "
        f"ubatch {s['n_ubatch']}, flash attention {'on' if s['flash_attn'] else 'off'}, "
        f"KV {s['cache_type_k']}/{s['cache_type_v']}, {s['gpu_layers']} layer(s) on the GPU"
    )
    table = Table(show_footer=True)
    table.add_column("component", footer="total")
    table.add_column("host", justify="right", footer=_size(est.host_bytes))
    table.add_column("device", justify="right", footer=_size(est.device_bytes))
    for name in COMPONENTS:
        part = est.breakdown[name]
        table.add_row(name.replace("_", " "), _size(part["host"]), _size(part["device"]))
    out.print(table)
    if est.host_growth_bytes:
        grows = ", ".join(f"{k.replace('_', ' ')} {_size(v)}" for k, v in est.growth.items() if v)
        out.print(
            f"[dim]may grow while serving by up to {_size(est.host_growth_bytes)}: {grows}[/]"
        )


def _print_split(
    info: Any, rpc: str, tensor_split: str | None, *, as_json: bool, **settings: Any
) -> None:
    """``estimate --rpc``: the per-device split, before anything starts; exit 1 if it does
    not fit."""
    from procman.cli._rpc import split_for  # speed
    from procman.distributed.rpc import parse_endpoints  # speed

    plan, _ = split_for(info, parse_endpoints(rpc), tensor_split, **settings)
    if as_json:
        out.print_json(json.dumps(plan.to_json()))
    else:
        table = Table()
        for column in ("device", "worker", "layers", "weights", "KV cache", "compute", "margin",
                       "total", "free", "fits"):  # fmt: skip
            table.add_column(column, justify="left" if column in ("device", "worker") else "right")
        for d in plan.devices:
            first_last = f"{d.layers[0]}-{d.layers[-1]}" if d.layers else "-"
            table.add_row(
                f"RPC{d.index}", d.endpoint, first_last + (" +out" if d.output else ""),
                _size(d.weights), _size(d.kv_cache), _size(d.compute), _size(d.margin),
                _size(d.total), _size(d.free) if d.free is not None else "?",
                "[green]yes[/]" if d.fits else "[red]no[/]",
            )  # fmt: skip
        out.print(table)
        shares = ",".join(f"{s:g}" for s in plan.shares)
        out.print(
            f"leader (this machine) holds {_size(plan.host_bytes)}; "
            f"--tensor-split {shares}: {'[green]fits[/]' if plan.fits else '[red]does not fit[/]'}"
        )
    if not plan.fits:
        raise typer.Exit(1)


def _print_placement(
    info: Any, devices: str, layers: int, *, as_json: bool, **settings: Any
) -> None:
    """``estimate --devices``: the GPUs ``serve`` would place the model on now, and what each
    would hold; exit 1 if it does not fit."""
    from procman.memory.budget import probe_machine  # speed
    from procman.memory.devices import cards_from, parse_devices, place  # speed

    items = [d.strip() for d in devices.split(",")]
    value: Any = items[0] if devices in ("auto", "all") else [
        int(d) if d.isdigit() else d for d in items
    ]  # fmt: skip
    try:
        setting = parse_devices(value)
    except ValueError as exc:
        raise ConfigError(f"--devices: {exc}", hint="e.g. --devices auto, all or 0,1") from None
    placement = place(setting, info, cards_from(probe_machine().gpus), layers=layers, **settings)
    if as_json:
        out.print_json(json.dumps(placement.to_json()))
    else:
        table = Table()
        for column in ("GPU", "name", "uuid", "needs", "room", "free", "fits"):
            table.add_column(
                column, justify="right" if column in ("needs", "room", "free") else "left"
            )
        for card, size in zip(placement.cards, placement.device_bytes, strict=True):
            table.add_row(
                str(card.index), escape(card.name), card.uuid, _size(size), _size(card.room),
                _size(card.free), "[green]yes[/]" if size <= card.room else "[red]no[/]",
            )  # fmt: skip
        out.print(table)
        out.print(escape(placement.reason))
    if not placement.fits:
        raise typer.Exit(1)
