"""``llamactl detect``: what this machine can build and run, and why."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from procman._units import format_bytes
from procman.cli._app import app, out

if TYPE_CHECKING:
    from buildtools.hardware import HardwareProfile


def _gib(n: int | None) -> str:
    return "?" if n is None else format_bytes(n, digits=1)


def _print_cpu(profile: HardwareProfile) -> None:
    cpu = profile.cpu
    cores = f", {cpu.cores} logical CPUs" if cpu.cores else ""
    out.print(f"[bold]CPU[/]       {escape(cpu.model)} ({escape(cpu.vendor)}), {cpu.arch}{cores}")
    out.print(f"[bold]features[/]  {' '.join(cpu.features) or 'none beyond the baseline'}")
    for feature, reason in cpu.advertised_only.items():
        out.print(f"[yellow]advertised only[/] {feature}: {escape(reason)}")
    for note in cpu.notes:
        out.print(f"[dim]note:[/] {escape(note)}")


def _print_gpus(profile: HardwareProfile) -> None:
    if not profile.gpus:
        out.print("[bold]GPUs[/]      none found")
        return
    table = Table(title="GPUs", title_justify="left", show_edge=False)
    for column in ("#", "vendor", "name", "memory (free)", "compute", "driver", "uuid"):
        table.add_column(column)
    for gpu in profile.gpus:
        memory = _gib(gpu.memory_bytes)
        if gpu.memory_free_bytes is not None:
            memory += f" ({_gib(gpu.memory_free_bytes)})"
        table.add_row(
            str(gpu.index),
            gpu.vendor,
            escape(gpu.name),
            memory,
            gpu.compute_capability or "-",
            escape(gpu.driver_version or "-"),
            escape(gpu.uuid or "-"),
        )
    out.print(table)


def _print_toolchains(profile: HardwareProfile) -> None:
    table = Table(title="Toolchains", title_justify="left", show_edge=False)
    for column in ("tool", "version", "path or reason"):
        table.add_column(column)
    for name, tool in sorted(profile.toolchains.items()):
        mark = "[green]✓[/]" if tool.found else "[red]✗[/]"
        where = tool.path if tool.found and not tool.reason else tool.reason
        if tool.found and tool.reason:
            where = f"{tool.path} ({tool.reason})"
        table.add_row(f"{mark} {name}", tool.version or "-", escape(where or ""))
    out.print(table)


def _print_backends(profile: HardwareProfile) -> None:
    table = Table(title="Backends", title_justify="left", show_edge=False)
    table.add_column("backend")
    table.add_column("reason", overflow="fold")
    for backend, status in sorted(profile.backends.items()):
        mark = "[green]✓[/]" if status.available else "[red]✗[/]"
        table.add_row(f"{mark} {backend}", escape(status.reason))
    out.print(table)


def _limits() -> dict[str, Any]:
    """The memory side: what ``auto`` budgets resolve to, and whether cgroups can enforce."""
    from procman.memory.budget import probe_machine, resolve_budget  # speed
    from procman.memory.enforce import detect_cgroup_v2  # speed

    cgroup = detect_cgroup_v2()
    budget = resolve_budget("auto", "auto", probe_machine())
    return {
        "cgroup_v2": {"available": cgroup.available, "reason": cgroup.reason},
        "budget": {
            "memory_bytes": budget.memory_bytes,
            "memory_reason": budget.memory_reason,
            "vram_bytes": budget.vram_bytes,
            "vram_reason": budget.vram_reason,
        },
    }


def _print_limits(limits: dict[str, Any]) -> None:

    out.print("[bold]Limits[/]")
    budget = limits["budget"]
    for what, key in (("memory", "memory"), ("VRAM", "vram")):
        size = budget[f"{key}_bytes"]
        shown = "unlimited" if size is None else format_bytes(size)
        out.print(f"  auto {what} budget: {shown} [dim]({escape(budget[f'{key}_reason'])})[/]")
    cgroup = limits["cgroup_v2"]
    mark = "[green]✓[/]" if cgroup["available"] else "[red]✗[/]"
    out.print(f"  {mark} cgroup v2 memory.max: {escape(cgroup['reason'])}")


@app.command()
def detect(
    as_json: Annotated[
        bool, typer.Option("--json", help="machine-readable output on stdout")
    ] = False,
) -> None:
    """Show the CPU features, GPUs, toolchains, buildable backends and memory limits here."""
    from buildtools.hardware import detect as detect_hardware  # speed

    profile = detect_hardware()
    limits = _limits()
    if as_json:
        data = {**profile.to_json(), **limits}
        out.print(json.dumps(data, indent=2), markup=False, highlight=False, emoji=False)
        return
    _print_cpu(profile)
    out.print()
    _print_gpus(profile)
    out.print()
    _print_toolchains(profile)
    out.print()
    _print_backends(profile)
    out.print()
    _print_limits(limits)
