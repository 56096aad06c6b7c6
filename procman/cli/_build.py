"""``llamactl build`` and ``llamactl builds``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from buildtools.errors import PlanError
from procman.cli._app import app, console, out
from procman.cli._progress import BuildProgressView

if TYPE_CHECKING:
    pass


def _parse_defines(defines: list[str]) -> dict[str, str]:
    parsed = {}
    for item in defines:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise PlanError(
                f"--define {item!r} is not NAME=VALUE", hint="e.g. --define GGML_LTO=ON"
            )
        parsed[name.removeprefix("-D")] = value
    return parsed


@app.command()
def build(
    backend: Annotated[
        str,
        typer.Option(
            help="auto, cpu, cuda, metal, opencl or vulkan; auto picks the best available"
        ),
    ] = "auto",
    portable: Annotated[
        bool, typer.Option(help="all CPU variants, best picked at run time")
    ] = False,
    native: Annotated[
        bool, typer.Option(help="target exactly this CPU with -march=native")
    ] = False,
    source: Annotated[
        Path | None, typer.Option(help="a llama.cpp source directory, or the pinned source tarball")
    ] = None,
    define: Annotated[
        list[str], typer.Option("--define", "-D", help="extra cmake define NAME=VALUE")
    ] = [],  # noqa: B006 - typer needs a list default
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", help="parallel compile jobs")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the plan, build nothing")
    ] = False,
    force: Annotated[bool, typer.Option(help="rebuild even if the plan is cached")] = False,
    wheel: Annotated[
        bool, typer.Option("--wheel", help="build a platform wheel carrying the verified server")
    ] = False,
    out_dir: Annotated[Path, typer.Option("--out", help="where --wheel puts the wheel")] = Path(
        "dist"
    ),
    repair: Annotated[
        bool, typer.Option("--repair", help="with --wheel: auditwheel repair to a manylinux tag")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="machine-readable output on stdout")
    ] = False,
) -> None:
    """Compile a verified llama-server for this machine into the build cache."""
    from buildtools import BuildOptions, build, make_plan, provision  # speed
    from buildtools.builder import compiler_identity  # speed
    from buildtools.demo import demo_model_path  # speed
    from buildtools.hardware import detect  # speed

    if wheel and not dry_run:
        from buildtools.wheel import build_wheel  # speed

        made = build_wheel(
            out_dir,
            backend=backend,
            portable=portable,
            defines=_parse_defines(define),
            on_line=lambda line: console.print(line, markup=False),
        )
        if repair:
            from buildtools.wheel import repair as repair_wheel  # speed

            made = repair_wheel(made, out_dir)
        out.print(str(made))
        return
    options = BuildOptions(
        backend=backend, portable=portable, native=native, extra_defines=_parse_defines(define)
    )
    profile = detect()
    plan = make_plan(profile, options)
    src = provision(source)
    compiler = compiler_identity(profile, plan)
    if dry_run:
        doc = plan.to_json(source_id=src.source_id, compiler=compiler)
        doc["source"] = {"path": str(src.path), "origin": src.origin, "version": src.version}
        if wheel:
            from buildtools.variant import glibc_version, plan_variant  # speed

            variant = plan_variant(plan, profile, glibc=glibc_version())
            doc["wheel"] = variant.to_json(_dist_version())
        if as_json:
            out.print_json(json.dumps(doc))
            return
        _print_plan(doc)
        return

    model = demo_model_path()
    if as_json:
        result = build(profile, options, src, model=model, jobs=jobs, force=force)
        out.print_json(json.dumps(result.to_json()))
        return

    _print_plan(plan.to_json(source_id=src.source_id, compiler=compiler), brief=True)
    with BuildProgressView() as view:
        result = build(profile, options, src, model=model, jobs=jobs, force=force, on_progress=view)
    info = result.to_json()
    verb = "cached" if result.cached else "built and verified"
    console.print(f"[green]✓[/] {verb} llama-server {info['version']} in {info['seconds']} s")
    for feature, why in result.turned_off.items():
        console.print(f"[yellow]turned off {feature}:[/] {why}")
    ver = info["verification"]
    if ver:
        ready, text = ver.get("seconds_to_ready"), ver.get("text", "")
        console.print(f"  verified: ready in {ready} s, answered {text!r}")
    out.print(info["binary"])


def _dist_version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # speed

    from buildtools.variant import DIST_NAME  # speed

    try:
        return version(DIST_NAME)
    except PackageNotFoundError:
        return "0+unknown"


def _print_plan(doc: dict[str, Any], *, brief: bool = False) -> None:
    from rich.table import Table  # speed

    table = Table(title=None if brief else f"build plan ({doc['backend']})", show_lines=False)
    table.add_column("define")
    table.add_column("value")
    table.add_column("why", overflow="fold")
    defines: dict[str, str] = doc["cmake_defines"]
    reasons: dict[str, str] = doc["reasons"]
    for name, value in defines.items():
        table.add_row(name, str(value), str(reasons.get(name, "")))
    console.print(table)
    console.print(
        f"backend: {doc['backend']}  targets: {', '.join(doc['targets'])}  "
        f"cache key: {doc['cache_key']}"
    )
    if whl := doc.get("wheel"):
        console.print(f"wheel: {whl['wheel']}  (label +{whl['label']})")
        if whl["repaired_wheel"]:
            console.print(f"  --repair: {whl['repaired_wheel']} (glibc of this machine: at most)")
        where = f"sub-index /{whl['index']}" if whl["index"] else "none (built for this CPU only)"
        console.print(f"  wheelhouse: {where}")


@app.command()
def builds(
    remove: Annotated[
        str | None, typer.Option(help="remove the cached build whose key starts with this")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="machine-readable output on stdout")
    ] = False,
) -> None:
    """List cached builds, and which one `llamactl serve` would use and why."""
    from buildtools import BuildCache, CacheError, candidates, resolve_server  # speed
    from buildtools.paths import home  # speed

    cache = BuildCache(home())
    if remove:
        victim = cache.find(remove)
        cache.remove(victim.key)
        console.print(f"removed {victim.key}")
        return
    cands = candidates()
    serve_uses: dict[str, str | None]
    try:
        chosen = resolve_server()
        serve_uses = {
            "binary": str(chosen.binary),
            "origin": chosen.origin,
            "reason": chosen.reason,
        }
    except CacheError as exc:
        serve_uses = {"binary": None, "origin": None, "reason": exc.message}
    if as_json:
        doc = {
            "builds": [
                {
                    "key": c.build.key,
                    "binary": str(c.build.binary),
                    "version": c.build.version,
                    "backend": c.build.backend,
                    "created": c.build.created,
                    "verified": c.build.verified,
                    "usable": c.usable,
                    "reason": c.reason,
                }
                for c in cands
            ],
            "serve_uses": serve_uses,
        }
        out.print_json(json.dumps(doc))
        return
    from rich.table import Table  # speed

    table = Table()
    for col in ("key", "version", "backend", "usable here", "why"):
        table.add_column(col)
    for c in cands:
        table.add_row(
            c.build.key, c.build.version, c.build.backend, "yes" if c.usable else "no", c.reason
        )
    out.print(table if cands else "no cached builds (run `llamactl build`)")
    out.print(f"serve would use: {serve_uses['binary'] or 'nothing'} ({serve_uses['reason']})")
