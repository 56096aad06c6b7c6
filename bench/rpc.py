"""A model split across two RPC workers on loopback vs the same build in one process.

Both run the same llama-server binary on the same model: A alone (CPU), B as a
leader with every layer on two ``ggml-rpc-server`` workers (127.0.0.2 and
127.0.0.3). Requests alternate A, B, A, B, ...; each is one prompt of ~300
tokens and 64 generated tokens (``ignore_eos``), and llama-server's own
``timings`` give prompt and generation tokens/s. The CPU time of every process
(psutil) over the B requests says where the time goes: the leader, each worker,
or nobody (waiting on the loopback round trips between them).
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from _common import (  # first: it puts the repository on sys.path
    HOST,
    SAME_SERVER,
    Section,
    _session,
    cmdline,
    fmt,
    healthy,
    launched,
    ratios,
    server_argv,
    spread,
    wait_until,
)

from procman.process._sockets import pick_free_port

__all__ = ["rpc_split"]

_PROMPT = " ".join(f"Item {i}: a short line of text about the number {i}." for i in range(24))


def _free(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def _accepting(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    return True


async def _timed(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    body = {
        "messages": [{"role": "user", "content": _PROMPT}],
        "max_tokens": 64,
        "temperature": 0,
        "ignore_eos": True,
        "cache_prompt": False,  # every round pays the whole prompt
    }
    async with session.post(
        f"{base}/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=600)
    ) as resp:
        doc = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"{base}: HTTP {resp.status}: {doc}")
    t = doc["timings"]
    return {
        "prompt_tps": float(t["prompt_per_second"]),
        "gen_tps": float(t["predicted_per_second"]),
        "prompt_n": float(t["prompt_n"]),
        "gen_n": float(t["predicted_n"]),
        "ms_per_gen_token": float(t["predicted_per_token_ms"]),
    }


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for label, pid in pids.items():
        times = psutil.Process(pid).cpu_times()
        out[label] = times.user + times.system
    return out


async def rpc_split(binary: Path, worker: Path, model: Path, work: Path, quick: bool) -> Section:
    rounds = 3 if quick else 10
    hosts = ("127.0.0.2", "127.0.0.3")
    endpoints = [f"{h}:{_free(h)}" for h in hosts]
    ports = {"alone": pick_free_port(), "rpc": pick_free_port()}
    # one thread everywhere: a worker's own default is half the cores (1 here), and on a
    # machine whose cores are shared a 2-thread process spends its time in spin barriers
    common = ["-c", "2048", "-np", "1", "-t", "1", *SAME_SERVER]
    argvs = {
        "alone": server_argv(binary, model, ports["alone"], *common),
        "rpc": server_argv(
            binary, model, ports["rpc"], *common, "--rpc", ",".join(endpoints), "-ngl", "all"
        ),
    }
    worker_argvs = [
        [str(worker), "-H", e.split(":")[0], "-p", e.split(":")[1], "-t", "1"] for e in endpoints
    ]
    bases = {label: f"http://{HOST}:{port}" for label, port in ports.items()}
    figures: dict[str, list[dict[str, float]]] = {"alone": [], "rpc": []}
    cpu_rounds: list[dict[str, float]] = []
    with (
        launched(worker_argvs[0], work / "worker0.log") as w0,
        launched(worker_argvs[1], work / "worker1.log") as w1,
    ):
        for proc, endpoint in zip((w0, w1), endpoints, strict=True):
            host, port = endpoint.split(":")
            await wait_until(lambda h=host, p=int(port): _accepting(h, p), proc, 30)
        with (
            launched(argvs["alone"], work / "alone.log") as alone,
            launched(argvs["rpc"], work / "rpc.log") as leader,
        ):
            async with _session() as session:
                for label, proc in (("alone", alone), ("rpc", leader)):
                    await wait_until(lambda b=bases[label]: healthy(session, b), proc, 180)
                for label in ("alone", "rpc"):  # warm-up: first-use costs out of the rounds
                    await _timed(session, bases[label])
                pids = {"leader": leader.pid, "worker0": w0.pid, "worker1": w1.pid}
                for _ in range(rounds):
                    figures["alone"].append(await _timed(session, bases["alone"]))
                    before, t0 = _cpu(pids), time.monotonic()
                    figures["rpc"].append(await _timed(session, bases["rpc"]))
                    wall, after = time.monotonic() - t0, _cpu(pids)
                    cpu_rounds.append({"wall": wall, **{k: after[k] - before[k] for k in pids}})
    section = _section(figures, cpu_rounds, argvs, worker_argvs, rounds)
    section["rows"] += _build_cost(binary)
    return section


def _build_cost(binary: Path) -> list[list[str]]:
    """Sizes of what every plan builds now, and against a cached build of the same source
    and compiler made before GGML_RPC (if this machine still has one)."""
    import json

    home = binary.parent.parent
    manifest = json.loads((home / "manifest.json").read_text())
    size = {b.name: b.stat().st_size for b in (home / "bin").iterdir() if b.is_file()}
    rows = [
        [f"binary size: {name}", "", f"{n / 1e6:.1f} MB", ""] for name, n in sorted(size.items())
    ]
    for other in sorted(home.parent.glob("*/manifest.json")):
        old = json.loads(other.read_text())
        same = old.get("source", {}).get("id") == manifest["source"]["id"]
        same = same and old.get("compiler") == manifest["compiler"]
        if same and old["plan"]["cmake_defines"].get("GGML_RPC") != "ON":
            before = (other.parent / "bin" / "llama-server").stat().st_size
            rows.append(
                ["llama-server size without RPC -> with", f"{before / 1e6:.2f} MB",
                 f"{size['llama-server'] / 1e6:.2f} MB", f"{size['llama-server'] / before:.3f}x"]
            )  # fmt: skip
            rows.append(
                ["compile seconds (manifest; other load on the machine differs)",
                 f"{old.get('compile_seconds', 0):.0f} s",
                 f"{manifest.get('compile_seconds', 0):.0f} s", ""]
            )  # fmt: skip
            break
    return rows


def _section(
    figures: dict[str, list[dict[str, float]]],
    cpu_rounds: list[dict[str, float]],
    argvs: dict[str, list[str]],
    worker_argvs: list[list[str]],
    rounds: int,
) -> Section:
    def series(label: str, key: str) -> list[float]:
        return [f[key] for f in figures[label]]

    rows: list[list[str]] = []
    for key, name in (("prompt_tps", "prompt tokens/s"), ("gen_tps", "generation tokens/s")):
        alone, split = series("alone", key), series("rpc", key)
        rows.append(
            [
                name,
                fmt(spread(alone), "", 1),
                fmt(spread(split), "", 1),
                fmt(ratios(alone, split), "x", 3),
            ]
        )
    added = [
        b - a
        for a, b in zip(
            series("alone", "ms_per_gen_token"), series("rpc", "ms_per_gen_token"), strict=True
        )
    ]
    rows.append(["added ms per generated token", "", "", fmt(spread(added), " ms", 2)])
    share: dict[str, Any] = {}
    total_wall = sum(r["wall"] for r in cpu_rounds)
    for who in ("leader", "worker0", "worker1"):
        share[who] = sum(r[who] for r in cpu_rounds) / total_wall
    rows.append(
        [
            "CPU during a split request (cores busy on average)",
            "",
            ", ".join(f"{k} {v:.2f}" for k, v in share.items()),
            "",
        ]
    )
    return {
        "title": "A model split across two RPC workers (loopback) vs one process",
        "commands": {
            "alone": cmdline(argvs["alone"]),
            "rpc leader": cmdline(argvs["rpc"]),
            **{f"worker {i}": cmdline(a) for i, a in enumerate(worker_argvs)},
        },
        "header": ["figure", "one process", "two RPC workers", "split / alone (per round)"],
        "rows": rows,
        "raw": {"figures": figures, "cpu": cpu_rounds},
        "notes": [
            f"{rounds} interleaved rounds after one warm-up each; each request: ~300 prompt "
            "tokens (no prompt cache) and 64 generated tokens, timings from llama-server's "
            "own `timings`. The same binary and model on both sides, one CPU thread in every "
            "process (the workers compute one after the other, so the split uses one core at "
            "a time, as the single process does).",
            "Build cost (measured once, 2026-12-02, by hand: the 5 objects of ggml-rpc, "
            "ggml-rpc-server and llama-fit-params deleted from the build tree, then "
            "`cmake --build WORK --target ggml-rpc-server llama-fit-params -j 2` under "
            "/usr/bin/time): 9 more ninja steps (210 -> 219) and 14.5 CPU-seconds, against "
            "~800 CPU-seconds for the whole build (1.8 %).",
            "With every layer on the workers, the leader only embeds the tokens and samples; "
            "each token crosses loopback to worker 0, then worker 1, then back. Cores busy "
            "below 1 in total mean time spent waiting on those hops rather than computing.",
        ],
    }
