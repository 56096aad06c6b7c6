"""llamactl's comparison suite: ``python bench/suite.py [--quick] [--full]`` or ``nox -s bench``.

Writes ``bench/results/<date>.json`` (every raw figure) and ``bench/REPORT.md``
(medians, spreads, ratios, each with the command that produced it and the
machine it ran on). Every comparison is interleaved within one run (A, B, A,
B, ...) so that noise from other processes on the machine falls on both
sides; ratios are computed per round and reported as median [p10-p90].

Sections: inference speed (llama-bench per build), router overhead (direct
vs ``llamactl serve`` vs llama.cpp's router mode), time to first answer
after launch, model swap time, supervisor footprint, memory estimate
accuracy, build time, a model split across two RPC workers vs one process, a
desktop app's start (import, prepare, first ready model), the ``/ui`` dashboard's load time
and the router's CPU with and without it open.
Every server this script starts listens on 127.0.0.1 only and is killed
(with its process group) before the script exits.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from _common import (  # first: it puts the repository on sys.path
    REPORT,
    RESULTS,
    ROOT,
    Section,
    cmdline,
    fmt,
)
from desktop import desktop_start
from memory import memory_corpus
from replicas import replicas_section
from router import router_overhead
from rpc import rpc_split
from sections import (
    _build_time,
    _footprint,
    _startup,
    inference,
)
from share import share
from swap import swap
from ui import ui_section

from buildtools import build_default
from buildtools.demo import demo_model_path
from procman.bench import machine_info


# -- the report -----------------------------------------------------------------------------------
def render(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        "# llamactl benchmark report",
        "",
        f"Last run: `{doc['command']}` on {doc['date']} in {doc['seconds']:.0f} s; "
        "each section says which run measured it.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB RAM, "
        f"GPU: {m['gpu']}; {m['platform']}, Python {m['python']}.",
        f"llama-server: `{doc['server']}` ({doc['server_version']}); model: `{doc['model']}`.",
        "",
        "Figures are median [p10-p90] (n = samples or rounds). The machine was shared with "
        "other jobs while this ran: comparisons are interleaved within the run so that noise "
        "falls on both sides; absolute figures are noisy.",
        f"Raw figures: `{doc['results_file']}`.",
    ]
    for sec in doc["sections"]:
        lines += ["", f"## {sec['title']}", ""]
        if "error" in sec:
            lines += [f"Not measured: `{sec['error']}`"]
            continue
        if "run" in sec:
            run = sec["run"]
            where = f" on {run['machine']}" if run.get("machine") else ""
            lines += [f"Measured by `{run['command']}`, {run['date']}{where}.", ""]
        lines += ["Commands:", ""]
        lines += [f"- {k}: `{v}`" for k, v in sec["commands"].items()]
        lines += ["", "| " + " | ".join(sec["header"]) + " |", "|" + "---|" * len(sec["header"])]
        lines += ["| " + " | ".join(row) + " |" for row in sec["rows"]]
        lines += [""] + [f"- {note}" for note in sec["notes"]]
        lines += [f"- Section time: {sec['seconds']:.0f} s."]
    lines += _cli_bench_section()
    return "\n".join(lines) + "\n"


CLI_BENCH = "llamactl-bench-demo"
CLI_BENCH_COMMAND = (
    f"llamactl bench demo --cases examples/bench_cases.toml --repeat 5 --json "
    f"--csv bench/results/{CLI_BENCH}.csv --plot bench/results/{CLI_BENCH}.png "
    f"> bench/results/{CLI_BENCH}.json"
)


def _cli_bench_section() -> list[str]:
    """Points at the last `llamactl bench` run kept in bench/results, if there is one."""
    doc_path = RESULTS / f"{CLI_BENCH}.json"
    if not doc_path.is_file():
        return []
    doc = json.loads(doc_path.read_text())
    lines = [
        "",
        "## `llamactl bench` on the demo model",
        "",
        f"Command: `{CLI_BENCH_COMMAND}` ({doc['started']}, {doc['seconds']:.0f} s).",
        "",
        "| case | first token (ms) | tokens/s | end (ms) |",
        "|---|---|---|---|",
    ]
    for res in doc["results"]:
        st = res["stats"]
        cells = [
            fmt(st[k], digits=1) if st.get(k) else "-" for k in ("ttft_ms", "tokens_per_s", "end")
        ]
        lines.append(f"| {res['case']} | " + " | ".join(cells) + " |")
    lines += ["", f"Table, CSV and plot: `bench/results/{CLI_BENCH}.{{txt,csv,png}}`."]
    return lines


def _machine() -> dict[str, Any]:
    info = machine_info()
    info["memory_gib"] = psutil.virtual_memory().total / 2**30
    info["gpu"] = "none" if shutil.which("nvidia-smi") is None else "nvidia-smi present"
    return info


def _previous(suffix: str) -> list[Section]:
    """The sections of the newest results file of the same kind (full or quick), if any."""
    files = sorted(RESULTS.glob(f"????-??-??{suffix}.json"))
    return json.loads(files[-1].read_text())["sections"] if files else []


def merge_sections(old: list[Section], new: list[Section], order: list[str]) -> list[Section]:
    """``old`` with each section of ``new`` put in place of the one it re-measures.

    Sections are matched by key; the result follows ``order``, the suite's
    own, with unknown old sections last.
    """
    by_key = {sec["key"]: sec for sec in old} | {sec["key"]: sec for sec in new}
    rank = {name: i for i, name in enumerate(order)}
    return sorted(by_key.values(), key=lambda sec: rank.get(sec["key"], len(rank)))


def _compile_bytecode() -> None:
    """Byte-compile the project, as ``pip install`` does: every ``llamactl`` the suite starts
    then loads it as a user's install would, even where PYTHONDONTWRITEBYTECODE is set (an
    editable install there compiles ~40 modules from source on every launch, ~50 ms)."""
    for package in ("procman", "buildtools"):
        compileall.compile_dir(ROOT / package, quiet=1)


def _binaries(server: Path | None) -> tuple[Path, Path, Path]:
    """llama-server (``--server`` or the default build), the RPC worker beside it, and the
    default build's llama-fit-params (the memory section's oracle)."""
    build = build_default().build
    binary = server or build.binary
    return binary, binary.with_name("ggml-rpc-server"), build.fit_params


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (~3 min)")
    parser.add_argument("--full", action="store_true", help="add cold builds (~20 min more)")
    parser.add_argument("--only", action="append", help="run only sections with this word")
    parser.add_argument(
        "--render", type=Path, metavar="RESULTS.json", help="only rewrite REPORT.md from results"
    )
    parser.add_argument(
        "--report", type=Path, default=REPORT, help="with --render: where to write the report"
    )
    parser.add_argument("--model", type=Path, help="a GGUF model (default: the demo model)")
    parser.add_argument(
        "--server", type=Path, help="a llama-server (default: the default build, built if needed)"
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        args.report.write_text(render(json.loads(args.render.read_text())))
        return 0
    started = time.monotonic()
    flags = [a for a, on in (("--quick", args.quick), ("--full", args.full)) if on]
    flags += [f"--only {word}" for word in args.only or ()]
    flags += [f"--{k} {v}" for k, v in (("model", args.model), ("server", args.server)) if v]
    command = " ".join(["python bench/suite.py", *flags])
    info = _machine()
    machine_label = f"{info['cpu']}, {info['cores']} cores, {info['platform']}"
    model = args.model or demo_model_path()
    binary, worker, fit_params = _binaries(args.server)
    version = (
        subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, check=False, timeout=30
        )
        .stderr.strip()
        .splitlines()
    )
    _compile_bytecode()
    sections: list[Section] = []
    runs: list[tuple[str, Callable[[Path], Any]]] = [
        ("inference", lambda w: inference(model, 1 if args.quick else 5)),
        ("router", lambda w: asyncio.run(router_overhead(binary, model, w, args.quick))),
        ("startup", lambda w: asyncio.run(_startup(binary, model, w, args.quick))),
        ("swap", lambda w: asyncio.run(swap(binary, model, w, args.quick))),
        ("footprint", lambda w: asyncio.run(_footprint(binary, model, w, args.quick))),
        ("memory", lambda w: memory_corpus(binary, fit_params, w, args.quick, args.full)),
        ("build", lambda w: _build_time(w, args.full, args.quick)),
        ("rpc", lambda w: asyncio.run(rpc_split(binary, worker, model, w, args.quick))),
        ("desktop", lambda w: desktop_start(binary, model, w, args.quick)),
        ("replicas", lambda w: asyncio.run(replicas_section(binary, model, w, args.quick))),
        ("share", lambda w: asyncio.run(share(binary, model, w, args.quick))),
        ("dashboard", lambda w: ui_section(binary, model, w, args.quick)),
    ]
    with tempfile.TemporaryDirectory(prefix="llamactl-bench-") as tmp:
        for name, run in runs:
            if args.only and not any(word in name for word in args.only):
                continue
            t0 = time.monotonic()
            print(f"[suite] {name} ...", file=sys.stderr, flush=True)
            try:
                sec = run(Path(tmp) / name)
            except Exception as exc:  # one broken section must not lose the others
                sec = {"title": name, "error": f"{type(exc).__name__}: {exc}"}
            sec["seconds"] = time.monotonic() - t0
            sec["key"] = name
            sec["run"] = {
                "command": command,
                "date": datetime.now(UTC).isoformat("T", "seconds"),
                "machine": machine_label,
            }
            print(f"[suite] {name} done in {sec['seconds']:.0f} s", file=sys.stderr, flush=True)
            sections.append(sec)
    now = datetime.now(UTC)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    results_file = RESULTS / f"{now:%Y-%m-%d}{suffix}.json"
    if args.only:  # a partial run updates its sections in the last report, it never drops others
        sections = merge_sections(_previous(suffix), sections, [name for name, _ in runs])
    doc = {
        "command": command,
        "date": now.isoformat(timespec="seconds"),
        "seconds": time.monotonic() - started,
        "machine": info,
        "server": cmdline([binary]),
        "server_version": version[0] if version else "unknown",
        "model": model.name,
        "results_file": str(results_file.relative_to(ROOT)),
        "sections": sections,
    }
    results_file.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    REPORT.write_text(render(doc))
    print(
        f"[suite] wrote {results_file.relative_to(ROOT)} and bench/REPORT.md "
        f"in {doc['seconds']:.0f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
