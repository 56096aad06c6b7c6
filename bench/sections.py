"""The suite's measurements, one function per report section.

Each returns a Section: rows, the commands behind them, raw figures and notes.
Comparisons are interleaved (A, B, A, B, ...) within one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from _common import (  # first: it puts the repository on sys.path
    HOST,
    LLAMACTL,
    SAME_SERVER,
    Section,
    _session,
    answered,
    cmdline,
    diffs,
    fmt,
    healthy,
    launched,
    ratios,
    server_argv,
    spread,
    wait_until,
)

from buildtools import BuildCache, build_default
from buildtools.paths import home
from buildtools.wheel import bundled_server
from procman.process._sockets import pick_free_port


# -- 1. inference speed ---------------------------------------------------------------------------
def _llama_bench(binary: Path, model: Path) -> tuple[list[str], dict[str, float]]:
    argv = [str(binary), "-m", str(model), "-p", "128", "-n", "64", "-r", "3", "-o", "json"]
    out = subprocess.run(argv, capture_output=True, check=True, timeout=300).stdout
    figures = {}
    for row in json.loads(out):
        key = "pp128" if row.get("n_prompt") else "tg64"
        figures[key] = float(row["avg_ts"])
    return argv, figures


def inference(model: Path, rounds: int) -> Section:
    cache = BuildCache(home())
    # the default plan's build, not whatever `serve` would pick (a newer
    # --native build would win there)
    default = build_default().build
    builds: dict[str, Path | None] = {"default verified build": default.bench_binary}
    native = [
        b
        for b in cache.list()
        if b.manifest.get("plan", {}).get("cmake_defines", {}).get("GGML_NATIVE") == "ON"
    ]
    builds["GGML_NATIVE build (`llamactl build --native`)"] = (
        native[0].bench_binary if native else None
    )
    # the portable wheel carries exactly the cached portable build's bin/
    portable = [b for b in cache.list() if b.portable]
    wheel = bundled_server()
    builds["portable build (what `build --wheel --portable` ships)"] = (
        portable[0].bench_binary if portable else (wheel.parent / "llama-bench") if wheel else None
    )
    present = {k: v for k, v in builds.items() if v is not None and v.is_file()}
    runs: dict[str, dict[str, list[float]]] = {k: {"pp128": [], "tg64": []} for k in present}
    commands: dict[str, str] = {}
    for r in range(rounds):
        order = list(present.items())
        for label, binary in order[r % len(order) :] + order[: r % len(order)]:
            argv, figures = _llama_bench(binary, model)
            commands[label] = cmdline(argv)
            for key, value in figures.items():
                runs[label][key].append(value)
    rows = []
    base = next(iter(runs.values()), None)
    for label in builds:
        if label not in runs:
            rows.append([label, "not measured (not cached/installed)", "", "", ""])
            continue
        got = runs[label]
        rows.append(
            [
                label,
                fmt(spread(got["pp128"]), " t/s"),
                fmt(spread(got["tg64"]), " t/s"),
                fmt(ratios(base["pp128"], got["pp128"]), "x", 3) if base else "",
                fmt(ratios(base["tg64"], got["tg64"]), "x", 3) if base else "",
            ]
        )
    return {
        "title": "Inference speed (llama-bench)",
        "commands": commands,
        "header": ["build", "prompt 128 (t/s)", "generate 64 (t/s)", "pp ratio", "tg ratio"],
        "rows": rows,
        "raw": runs,
        "notes": [
            f"{rounds} interleaved rounds of `llama-bench -r 3`; figures are median [p10-p90] "
            "over rounds of llama-bench's own average; ratios are per round vs the default build.",
            "A GGML_NATIVE build is measured only when one is cached (`llamactl build --native`)"
            "; the suite never compiles unless --full.",
        ],
    }


# -- 2. launch to first answer --------------------------------------------------------------------
async def _startup(binary: Path, model: Path, work: Path, quick: bool) -> Section:
    # the added time's p10-p90 spans ~200 ms here: the median of 11 rounds moved by
    # +-30 ms between runs, so 21
    rounds = 3 if quick else 21
    direct, early, late = (
        "direct (poll /health)",
        "llamactl serve",
        "llamactl serve, early start off",
    )
    times: dict[str, list[float]] = {direct: [], early: [], late: []}
    envs = {early: {}, late: {"LLAMACTL_EARLY_START": "0"}}
    # the same command each round, as a user would repeat it: one public port per path
    ports = {label: pick_free_port(HOST) for label in envs}
    commands: dict[str, str] = {}

    def serve_argv(port: int) -> list[str]:
        args = ["serve", str(model), "--port", str(port), "--server", str(binary)]
        return [*LLAMACTL, *args, "--name", "demo"]

    async with _session() as session:
        for label, env in envs.items():  # once unmeasured: what the early start reads is recorded
            with launched(serve_argv(ports[label]), work / "startup-prime.log", env) as proc:
                url = f"http://{HOST}:{ports[label]}"
                await wait_until(lambda url=url: answered(session, url, "demo"), proc)
        for r in range(rounds):
            order = list(times)
            for label in order[r % 3 :] + order[: r % 3]:
                if label == direct:
                    port = pick_free_port(HOST)
                    argv: list[str] = server_argv(binary, model, port, *SAME_SERVER)
                else:
                    port = ports[label]
                    argv = serve_argv(port)
                url = f"http://{HOST}:{port}"
                extra_env = envs.get(label)
                commands[label] = " ".join(
                    [*(f"{k}={v}" for k, v in (extra_env or {}).items()), cmdline(argv)]
                )
                t0 = time.monotonic()
                log = work / f"startup-{'direct' if label == direct else 'serve'}.log"
                with launched(argv, log, extra_env) as proc:
                    if label == direct:
                        await wait_until(lambda url=url: healthy(session, url), proc)
                    t1 = await wait_until(lambda url=url: answered(session, url, "demo"), proc)
                    times[label].append(1000 * (t1 - t0))
    added = diffs(times[direct], times[early])
    added_late = diffs(times[direct], times[late])
    rows = [[k, fmt(spread(v), " ms", 0)] for k, v in times.items()]
    rows.append(["added by llamactl (paired)", fmt(added, " ms", 0)])
    rows.append(["added with early start off (paired)", fmt(added_late, " ms", 0)])
    verdict = "met" if added and added["median"] <= 100 else "NOT met"
    return {
        "title": "Launch to first answered request",
        "commands": commands,
        "header": ["how", "launch -> first 1-token answer"],
        "rows": rows,
        "raw": times,
        "notes": [
            f"{rounds} interleaved rounds, after one unmeasured launch of each llamactl command "
            "(a user's second `serve` of the same model). Direct: spawn llama-server, poll "
            "/health every 10 ms, then send the request. llamactl: spawn `llamactl serve`, retry "
            "the request every 10 ms until answered (its router accepts early and holds "
            "requests until ready).",
            "Early start: `serve` starts the llama-server the same command ran last time before "
            "its CLI loads, then adopts it only if its checks choose the same command line "
            "(see procman/process/_early.py); `LLAMACTL_EARLY_START=0` turns it off, as on a first "
            "launch.",
            f"Target: added <= 100 ms: {verdict} (median added {added['median']:.0f} ms)."
            if added
            else "Target: not measured.",
            "The added time includes the Python interpreter start and the imports of the CLI "
            "(its bytecode compiled first, as `pip install` does).",
        ],
    }


# -- 3. supervisor footprint ----------------------------------------------------------------------
_HARNESS = """
import asyncio, sys
from pathlib import Path
from procman.router.listen import bind_listener
from procman.router import Router, RouterSettings
from procman.spec import ServerSpec
from procman.supervisor import AsyncSupervisor
n, binary, model, port = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
async def main():
    async with AsyncSupervisor() as sup:
        for i in range(n):
            await sup.serve(ServerSpec(name=f"m{i}", model=model, binary=binary, ctx=2048))
        router = Router(sup, RouterSettings())
        await router.start(bind_listener("127.0.0.1", port))
        print("READY", flush=True)
        try:
            await asyncio.sleep(3600)
        finally:
            await router.stop()
asyncio.run(main())
"""


async def _footprint(binary: Path, model: Path, work: Path, quick: bool) -> Section:
    seconds = 5 if quick else 10
    rows, raw, commands = [], {}, {}
    setups = [
        ("llamactl serve, 1 server", 1, "serve"),
        ("Supervisor+Router (library), 1 server", 1, "lib"),
        ("Supervisor+Router (library), 3 servers", 3, "lib"),
    ]
    async with _session() as session:
        for label, n, kind in setups:
            port = pick_free_port(HOST)
            url = f"http://{HOST}:{port}"
            if kind == "serve":
                argv = [
                    *LLAMACTL,
                    "serve",
                    str(model),
                    "--port",
                    str(port),
                    "--server",
                    str(binary),
                    "--name",
                    "demo",
                ]
            else:
                argv = [sys.executable, "-c", _HARNESS, str(n), str(binary), str(model), str(port)]
            shown = [*argv[:2], "<harness in bench/suite.py>", *argv[3:]]
            commands[label] = cmdline(shown if kind == "lib" else argv)
            name = "m0" if kind == "lib" else "demo"
            with launched(argv, work / f"footprint-{kind}-{n}.log") as proc:
                await wait_until(lambda url=url, name=name: answered(session, url, name), proc)
                ps = psutil.Process(proc.pid)
                children = len(ps.children(recursive=True))
                ps.cpu_percent(None)
                rss, cpu = [], []
                for _ in range(seconds):
                    await asyncio.sleep(1.0)
                    rss.append(ps.memory_info().rss / 2**20)
                    cpu.append(ps.cpu_percent(None))
            raw[label] = {"rss_mib": rss, "cpu_percent": cpu, "children": children}
            rows.append([label, str(children), fmt(spread(rss), " MiB"), fmt(spread(cpu), " %", 2)])
    return {
        "title": "Supervisor footprint while idle",
        "commands": commands,
        "header": [
            "process",
            "llama-server children",
            "RSS of the llamactl process",
            "CPU% of the llamactl process",
        ],
        "rows": rows,
        "raw": raw,
        "notes": [
            f"Sampled once a second for {seconds} s after the first answer, via psutil, "
            "for the Python process only (its llama-server children excluded). The library "
            "harness runs procman.Supervisor + procman.Router with N demo servers "
            "(ctx 2048): the multi-server shape `llamactl serve` does not expose yet.",
        ],
    }


# -- 5. build time --------------------------------------------------------------------------------
def _build_time(work: Path, full: bool, quick: bool) -> Section:
    argv = [*LLAMACTL, "build"]
    warm = []
    for _ in range(2 if quick else 5):
        t0 = time.monotonic()
        subprocess.run(argv, capture_output=True, check=True, timeout=120)
        warm.append(time.monotonic() - t0)
    rows = [["`llamactl build`, warm (cache hit)", fmt(spread(warm), " s", 2)]]
    raw: dict[str, Any] = {"warm_s": warm}
    notes = [
        "Warm: the verified build is in the cache; the time is the whole CLI run "
        "(interpreter start, hardware probe, plan, cache lookup)."
    ]
    commands = {"warm": cmdline(argv)}
    if full:
        cold, upstream, upstream_warm = _cold_builds(work)
        raw |= {"cold_s": cold[1], "upstream_s": upstream[1], "upstream_warm_s": upstream_warm[1]}
        commands |= {"cold": cold[0], "upstream": upstream[0], "upstream warm": upstream_warm[0]}
        rows.append(["`llamactl build`, cold (empty cache, ccache off)", f"{cold[1]:.0f} s"])
        rows.append(["upstream default cmake build, cold (ccache off)", f"{upstream[1]:.0f} s"])
        rows.append(
            ["upstream default cmake build, warm (up to date)", f"{upstream_warm[1]:.2f} s"]
        )
        rows.append(["cold ratio llamactl / upstream", f"{cold[1] / upstream[1]:.2f}x"])
        notes.append(
            "Cold: one round each, back to back (a round is 5-40 min on 2 cores). llamactl "
            "compiles llama-server and llama-bench with ninja on every core, verifies the "
            "result on the demo model; upstream's documented command configures with the "
            "default generator (make) and builds every target (tools, examples, tests) "
            "with one job, since `cmake --build` passes no -j."
        )
    else:
        rows.append(["`llamactl build`, cold", "run with --full"])
        rows.append(
            ["upstream `cmake -B build && cmake --build build --config Release`", "run with --full"]
        )
        notes.append("Cold builds take ~8-10 min each on 2 cores; `python bench/suite.py --full`.")
    return {
        "title": "Build time",
        "commands": commands,
        "header": ["what", "seconds"],
        "rows": rows,
        "raw": raw,
        "notes": notes,
    }


def _cold_builds(work: Path) -> tuple[tuple[str, float], ...]:
    """A cold llamactl build into a scratch home, then upstream's default build, cold and warm."""
    source = Path(build_default().build.manifest["source"]["path"])
    env = os.environ | {"CCACHE_DISABLE": "1"}
    scratch = work / "cold-home"
    scratch.mkdir(parents=True, exist_ok=True)
    for shared in ("downloads", "sources", "models"):  # no re-download, same source
        with contextlib.suppress(FileExistsError):
            (scratch / shared).symlink_to(home() / shared)
    argv = [*LLAMACTL, "build"]
    t0 = time.monotonic()
    subprocess.run(argv, env=env | {"LLAMACTL_HOME": str(scratch)}, check=True, timeout=3600)
    ours = time.monotonic() - t0
    build = work / "upstream-build"
    configure = [
        "cmake",
        "-S",
        str(source),
        "-B",
        str(build),
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_OPENSSL=OFF",
    ]
    compile_ = ["cmake", "--build", str(build), "--config", "Release"]
    t0 = time.monotonic()
    subprocess.run(configure, env=env, check=True, capture_output=True, timeout=600)
    subprocess.run(compile_, env=env, check=True, capture_output=True, timeout=7200)
    theirs = time.monotonic() - t0
    t0 = time.monotonic()  # upstream's warm case: the same command again, nothing to compile
    subprocess.run(compile_, env=env, check=True, capture_output=True, timeout=600)
    theirs_warm = time.monotonic() - t0
    return (
        (cmdline(argv), ours),
        (f"{cmdline(configure)} && {cmdline(compile_)}", theirs),
        (cmdline(compile_), theirs_warm),
    )
