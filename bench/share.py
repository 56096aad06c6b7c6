"""Two models computing at once on the CPU: llamactl's thread share vs llama-server's default.

``serve --config`` with two models of the demo file: four clients keep model
``busy`` answering short streamed chat completions while one client streams
a long answer from model ``other``. Measured: the long answer's generation
speed, and how many short answers ``busy`` completed meanwhile. Once with
llamactl's default (each server gets ``--threads cores / 2``), once with
``-t CORES`` on both (llama-server's own default here: a thread per core).
Interleaved, a fresh ``serve`` per run; an answer not done in ``LIMIT``
seconds counts as that (the default can stall for minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import aiohttp
from _common import (  # first: it puts the repository on sys.path
    HOST,
    LLAMACTL,
    Section,
    _session,
    answered,
    cmdline,
    fmt,
    healthy,
    launched,
    spread,
    wait_until,
)

from procman.process._sockets import pick_free_port
from procman.process.cpu import usable_cores

__all__ = ["share"]

LIMIT = 60.0
TOKENS = 200


def _config(model: Path, port: int, work: Path, label: str, args: str) -> Path:
    lines = ["[server]", f'host = "{HOST}"', f"port = {port}"]
    for name, parallel in (("busy", 4), ("other", 1)):
        lines += ["", f"[models.{name}]", f"path = {json.dumps(str(model))}", "ctx = 1024"]
        lines += [f"parallel = {parallel}", *([args] if args else [])]
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"share-{label}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def _stream(session: aiohttp.ClientSession, base: str, model: str, tokens: int) -> int:
    """Stream an answer; the number of content chunks received."""
    body = {
        "model": model, "messages": [{"role": "user", "content": "Count to ten."}],
        "max_tokens": tokens, "stream": True, "ignore_eos": True,
    }  # fmt: skip
    chunks = 0
    async with session.post(f"{base}/v1/chat/completions", json=body) as r:
        async for line in r.content:
            chunks += line.startswith(b"data: {")
    return chunks


async def _one_run(session: aiohttp.ClientSession, base: str) -> tuple[float | None, float]:
    """(tokens/s of the long answer or None if not done in LIMIT, short answers/s meanwhile)."""
    done = 0
    stop = asyncio.Event()

    async def busy() -> None:
        nonlocal done
        while not stop.is_set():
            await _stream(session, base, "busy", 12)
            done += 1

    clients = [asyncio.create_task(busy()) for _ in range(4)]
    await asyncio.sleep(2)  # the busy model is computing
    t0, start = time.perf_counter(), done
    try:
        chunks = await asyncio.wait_for(_stream(session, base, "other", TOKENS), LIMIT)
        speed: float | None = chunks / (time.perf_counter() - t0)
    except TimeoutError:
        speed = None
    elapsed = time.perf_counter() - t0
    short = (done - start) / elapsed
    stop.set()
    for task in clients:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
        await asyncio.gather(*clients)
    return speed, short


async def share(binary: Path, model: Path, work: Path, quick: bool) -> Section:
    rounds = 2 if quick else 4
    cores = usable_cores()
    variants = {"llamactl (threads shared)": "", f"-t {cores} on both": f'args = ["-t", "{cores}"]'}
    speeds: dict[str, list[float | None]] = {label: [] for label in variants}
    shorts: dict[str, list[float]] = {label: [] for label in variants}
    commands: dict[str, str] = {}
    async with _session() as session:
        for r in range(rounds):
            labels = list(variants)[r % 2 :] + list(variants)[: r % 2]
            for label in labels:
                port = pick_free_port(HOST)
                tag = "shared" if "shared" in label else "default"
                config = _config(model, port, work, tag, variants[label])
                argv = [*LLAMACTL, "serve", "--config", str(config), "--server", str(binary)]
                given = variants[label] or "no args"
                commands[label] = f"{cmdline(argv)}  ({config.name}: {given})"
                url = f"http://{HOST}:{port}"
                with launched(argv, work / f"share-{tag}.log") as proc:
                    await wait_until(lambda u=url: healthy(session, u), proc)
                    for name in ("busy", "other"):
                        await wait_until(lambda n=name, u=url: answered(session, u, n), proc)
                    speed, short = await _one_run(session, url)
                speeds[label].append(speed)
                shorts[label].append(short)
    rows = []
    for label in variants:
        finished = [s for s in speeds[label] if s is not None]
        stalled = len(speeds[label]) - len(finished)
        rows.append([
            label,
            fmt(spread(finished), " tok/s") if finished else "none finished",
            f"{stalled} of {len(speeds[label])}",
            fmt(spread(shorts[label]), "/s", 2),
        ])  # fmt: skip
    return {
        "title": "Two models computing at once on the CPU",
        "commands": commands,
        "header": [
            "threads",
            f"long answer ({TOKENS} tokens) from the second model",
            f"not done in {LIMIT:g} s",
            "short answers/s from the first (4 clients)",
        ],
        "rows": rows,
        "raw": {"speeds": speeds, "shorts": shorts, "cores": cores},
        "notes": [
            f"{rounds} interleaved rounds on {cores} core(s), a fresh `serve --config` per run, "
            "two models of the demo file (`busy` with 4 slots, `other` with 1).",
            f"`-t {cores}` is llama-server's own default here (a thread per core), what every "
            "server got before llamactl shared the cores.",
            "A long answer's speed is its chunks over its wall time; one not done in "
            f"{LIMIT:g} s is counted as not done, not in the speed.",
        ],
    }
