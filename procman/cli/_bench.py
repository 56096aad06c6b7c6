"""``llamactl bench``: time first token, N-th token, end and tokens/s on real servers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from procman.cli._app import app, console, out

if TYPE_CHECKING:
    from rich.table import Table

    from procman.bench import BenchReport, Stats, Target

__all__ = ["bench"]

#: used when no --cases file is given: one short and one longer answer
_DEFAULT_CASES = """
[[case]]
name = "short"
prompt = "Name three colours."
max_tokens = 16
checkpoints = [1, 8, "end"]

[[case]]
name = "story"
prompt = "Write a short story about a lighthouse keeper."
max_tokens = 128
checkpoints = [1, 32, 128, "end"]
"""


def _cells(st: Stats | None, digits: int) -> tuple[str, str, str, str]:
    if st is None:
        return ("-", "-", "-", "0")
    return (
        f"{st.median:.{digits}f}",
        f"{st.p10:.{digits}f}",
        f"{st.p90:.{digits}f}",
        str(st.n),
    )


def _targets(models: list[str], builds: list[str]) -> list[Target]:
    import buildtools  # speed
    from buildtools.paths import home  # speed
    from procman.bench import Target  # speed
    from procman.models.gguf import validate_model  # speed
    from procman.models.refs import default_name, resolve_model  # speed

    chosen: list[tuple[str | None, Path]]
    if builds:
        cache = buildtools.BuildCache(home())
        chosen = [(b.key, b.binary) for b in (cache.find(prefix) for prefix in builds)]
    else:
        resolved = buildtools.resolve_server()
        chosen = [(resolved.build.key if resolved.build else None, resolved.binary)]
    targets = []
    for ref in models or ["demo"]:
        path = resolve_model(ref)
        validate_model(path)
        for key, binary in chosen:
            name = default_name(path, ref)
            label = f"{name}@{key[:8]}" if key and len(chosen) > 1 else name
            targets.append(Target(label=label, binary=binary, model=path, build_key=key))
    return targets


def _table(report: BenchReport) -> Table:
    """One row per figure: narrow enough for a terminal whatever the checkpoints."""
    from rich.table import Table  # speed

    from procman.bench import checkpoint_label  # speed

    table = Table(title="median and p10-p90 over repetitions; times in ms after the request")
    for col in ("target", "case", "figure", "median", "p10", "p90", "n"):
        table.add_column(col, justify="left" if col in {"target", "case", "figure"} else "right")
    for i, result in enumerate(report.results):
        st = result.stats()
        figures = [("first token (ms)", "ttft_ms", 1), ("tokens/s", "tokens_per_s", 1)]
        figures += [("tokens", "tokens", 0)]
        figures += [
            (f"{checkpoint_label(c)} (ms)", checkpoint_label(c), 1)
            for c in result.case.checkpoints
            if c != 1
        ]
        for j, (title, key, digits) in enumerate(figures):
            table.add_row(
                escape(result.target.label) if j == 0 else "",
                escape(result.case.name) if j == 0 else "",
                title,
                *_cells(st.get(key), digits),
                end_section=j == len(figures) - 1 and i < len(report.results) - 1,
            )
    return table


@app.command()
def bench(
    models: Annotated[
        list[str] | None,
        typer.Argument(help="Models (.gguf paths or names in the cache); default: demo."),
    ] = None,
    *,
    build: Annotated[
        list[str] | None,
        typer.Option(help="A cached build by key prefix (repeatable); default: what serve runs."),
    ] = None,
    cases: Annotated[
        Path | None, typer.Option(help="TOML file of [[case]] tables (see examples/).")
    ] = None,
    repeat: Annotated[int, typer.Option(min=1, help="Timed repetitions of each case.")] = 5,
    warmup: Annotated[bool, typer.Option(help="Run each case once, untimed, first.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="The full report on stdout.")] = False,
    csv: Annotated[Path | None, typer.Option(help="Write the summary as CSV.")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write a PNG plot (needs llamactl-server[bench]).")
    ] = None,
) -> None:
    """Benchmark servers llamactl manages: time to first token, checkpoints, tokens/s.

    Every (build, model) pair is started once; repetitions alternate between
    them so that noise from other processes falls on all alike.
    """
    from procman.bench import load_cases, parse_cases, run_bench, write_csv, write_plot  # speed

    if plot is not None:
        try:
            import matplotlib  # speed  # noqa: F401 - fail before minutes of measuring, not after
        except ImportError:
            from procman.errors import ConfigError  # speed

            raise ConfigError(
                "--plot needs matplotlib", hint="pip install 'llamactl-server[bench]'"
            ) from None
    import tomllib  # speed

    case_list = (
        load_cases(cases)
        if cases is not None
        else parse_cases(tomllib.loads(_DEFAULT_CASES), source="built-in cases")
    )
    targets = _targets(models or [], build or [])
    with console.status("benchmarking") as status:
        report = asyncio.run(
            run_bench(
                targets,
                case_list,
                repeat=repeat,
                warmup=warmup,
                on_progress=lambda msg: status.update(escape(msg)),
            )
        )
    if as_json:
        out.print_json(json.dumps(report.to_json()))
    else:
        out.print(_table(report))
    if csv is not None:
        write_csv(report, csv)
        console.print(f"[dim]CSV: {escape(str(csv))}[/]")
    if plot is not None:
        write_plot(report, plot)
        console.print(f"[dim]plot: {escape(str(plot))}[/]")
    console.print(
        f"[dim]{len(targets)} target(s) x {len(case_list)} case(s) x {repeat} repetition(s) "
        f"in {report.seconds:.1f} s on {escape(str(report.machine['cpu']))}, "
        f"{report.machine['cores']} cores[/]"
    )
