"""Router overhead: direct llama-server vs ``llamactl serve`` vs llama.cpp's router mode.

One-token requests sequentially (latency added per request, paired) and from
16 concurrent clients (latency and throughput), then streamed answers
(tokens/s, and the CPU the process in front of llama-server spends per
token). The paths take turns within one run, against the same
llama-server build and model, each started with the flags llamactl gives
its own. A fourth path, a raw TCP relay in front of a llama-server of its
own (``_tcp_relay.py``), is the floor: what one more process in the path costs
here, whatever it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import aiohttp
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
    one_token,
    ratios,
    server_argv,
    spread,
    wait_until,
)

from procman.bench import BenchCase, percentile, stream_case
from procman.process._sockets import pick_free_port

T = TypeVar("T")

#: the floor: bytes relayed by a process in front of a llama-server, nothing else
RELAY = "raw TCP relay"


def _turn(calls: list[T], i: int) -> list[T]:
    """Round ``i``'s order of the calls: each goes first equally often."""
    k = i % len(calls)
    return calls[k:] + calls[:k]


def _own_server(pid: int) -> tuple[str, str | None]:
    """Where the llama-server a front process runs (its child) listens: its base URL, and
    its Unix socket if it listens on one (llamactl's private servers do)."""
    for child in psutil.Process(pid).children(recursive=True):
        argv = child.cmdline()
        if "--models-dir" in argv or "--host" not in argv:
            continue
        if "--port" in argv:
            return f"http://{HOST}:{argv[argv.index('--port') + 1]}", None
        if (host := argv[argv.index("--host") + 1]).endswith(".sock"):
            return "http://localhost", host
    raise RuntimeError(f"no llama-server under process {pid}")


class Targets:
    """Direct llama-server, ``llamactl serve``, llama.cpp's router mode and the raw relay, all
    running, and the llama-server behind each front (``own``)."""

    def __init__(self, binary: Path, model: Path, work: Path) -> None:
        self.binary, self.model, self.work = binary, model, work
        self.stack = contextlib.ExitStack()
        self.urls: dict[str, str] = {}
        self.models: dict[str, str] = {}
        self.commands: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        #: the llama-server behind each path but "direct", called directly (its port or socket)
        self.own: dict[str, str] = {}
        #: sessions for the own servers that listen on a Unix socket
        self.own_sessions: dict[str, aiohttp.ClientSession] = {}

    async def start(self, session: aiohttp.ClientSession) -> None:
        models_dir = self.work / "models"
        models_dir.mkdir(parents=True, exist_ok=True)
        link = models_dir / self.model.name
        if not link.exists():
            link.symlink_to(self.model)
        p1, p2, p3, p4, p5 = (pick_free_port(HOST) for _ in range(5))
        # the relay fronts a llama-server of its own: sharing the direct one would hand
        # "direct" warm caches each time it follows the relay's request (it read ~3 ms
        # faster per sequential request than every other path when it did)
        relayed = server_argv(self.binary, self.model, p5, *SAME_SERVER)
        self.stack.enter_context(launched(relayed, self.work / "relayed server.log"))
        argvs: dict[str, Sequence[str | Path]] = {
            # the servers all run with llamactl's defaults (--cache-ram 0: no host
            # prompt cache; --threads-http), so that only the path in front of them differs
            "direct": server_argv(self.binary, self.model, p1, *SAME_SERVER),
            "llamactl serve": [
                *LLAMACTL,
                "serve",
                str(self.model),
                "--port",
                str(p2),
                "--server",
                str(self.binary),
                "--name",
                "demo",
            ],
            "llama.cpp router": [
                str(self.binary),
                "--models-dir",
                str(models_dir),
                "--models-max",
                "1",
                "--host",
                HOST,
                "--port",
                str(p3),
                *SAME_SERVER,
            ],
            RELAY: [sys.executable, Path(__file__).with_name("_tcp_relay.py"), str(p4), str(p5)],
        }
        for (label, argv), port in zip(argvs.items(), (p1, p2, p3, p4), strict=True):
            proc = self.stack.enter_context(launched(argv, self.work / f"{label}.log"))
            self.urls[label] = f"http://{HOST}:{port}"
            self.commands[label] = cmdline(argv)
            if label == RELAY:
                self.commands[label] += f"` in front of `{cmdline(relayed)}"
            self.models[label] = "demo"
            self.procs[label] = proc
        for label, url in self.urls.items():
            await wait_until(lambda url=url: healthy(session, url), self.procs[label])
        router = self.urls["llama.cpp router"]
        async with session.get(f"{router}/v1/models") as r:
            data = (await r.json())["data"]
        self.models["llama.cpp router"] = data[0]["id"]
        for label, url in self.urls.items():  # loads the router-mode model; warms every path
            model = self.models[label]
            await wait_until(lambda u=url, m=model: answered(session, u, m), self.procs[label])
            if label != "direct":
                own, socket = (
                    (f"http://{HOST}:{p5}", None)
                    if label == RELAY
                    else _own_server(self.procs[label].pid)
                )
                self.own[label] = own
                if socket is not None:
                    self.own_sessions[label] = aiohttp.ClientSession(
                        connector=aiohttp.UnixConnector(socket, force_close=True)
                    )
            for _ in range(3):
                await one_token(session, url, model)
            # and each server's first concurrent batch (~2x slower than the next ones), which
            # would otherwise fall on whichever path the first block of clients reaches first
            await asyncio.gather(*(one_token(session, url, model) for _ in range(CLIENTS)))

    def close(self) -> None:
        self.stack.close()

    async def aclose(self) -> None:
        for session in self.own_sessions.values():
            await session.close()
        self.close()


#: concurrent clients in the throughput blocks
CLIENTS = 16

#: streamed rounds per call: the per-sample noise here is ~+-7%, and the median ratio of n
#: rounds is known to ~+-9%/sqrt(n), so 1% needs many
STREAM_ROUNDS = 40


def _cpu_seconds(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return float(times.user + times.system)


def _per_token(samples: list[float]) -> str:
    # each sample is quantised to 10 ms of CPU over ~128 tokens: the mean, not the median
    if not samples:
        return "not measured"
    return f"{sum(samples) / len(samples):.0f} µs (n={len(samples)})"


async def _streaming(
    session: aiohttp.ClientSession, targets: Targets, labels: list[str], quick: bool, budget: float
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    """Streamed tokens/s per path and per front's own llama-server called directly, and the
    front process's CPU per token.

    Separate llama-server processes differ in speed by a few percent within a run, which
    a comparison with the "direct" server charges to the path; each front's own server,
    called directly, takes turns with the paths, so that each front is also compared with
    the very server behind it.
    """
    stream: dict[str, list[float]] = {k: [] for k in labels}
    own: dict[str, list[float]] = {k: [] for k in targets.own}
    calls = [(k, False) for k in labels] + [(k, True) for k in targets.own]
    # CPU of the process in front of llama-server (llamactl serve; llama.cpp's
    # router process, its model server excluded), per streamed token
    front = {k: psutil.Process(targets.procs[k].pid) for k in labels if k != "direct"}
    cpu: dict[str, list[float]] = {k: [] for k in front}
    # per-sample noise is ~+-7% on 2 cores: a 1% effect needs many rounds
    tokens, rounds = (64, 6) if quick else (128, STREAM_ROUNDS)
    case = BenchCase(name="stream", prompt="Tell me a story.", max_tokens=tokens)
    until = time.monotonic() + 5 * budget
    for i in range(rounds):
        if i and time.monotonic() > until:
            break
        for label, direct in _turn(calls, i):
            url = targets.own[label] if direct else targets.urls[label]
            name = targets.models[label]
            before = _cpu_seconds(front.get(label))
            via = targets.own_sessions.get(label, session) if direct else session
            sample = await stream_case(via, url, case, model=name)
            if sample.tokens_per_s:
                (own if direct else stream)[label].append(sample.tokens_per_s)
            if label in front and not direct and sample.tokens:
                spent = _cpu_seconds(front[label]) - before
                cpu[label].append(1e6 * spent / sample.tokens)
    return stream, own, cpu


async def router_overhead(binary: Path, model: Path, work: Path, quick: bool) -> Section:
    # the added latency is a difference of two noisy figures (p10-p90 spans ~10 ms here):
    # its median is known to ~0.3 ms with 400 pairs
    n_seq = 30 if quick else 400
    # blocks: the p50 of one block moves by +-15 ms between blocks here, so the added
    # latency is taken per block (paths interleaved) and its median reported; with 24
    # blocks that median is known to ~+-3 ms (8 left it at ~+-5 ms)
    clients, per_client, blocks = CLIENTS, (2 if quick else 4), (1 if quick else 24)
    # each phase also stops at a time budget: on a loaded machine a round can take seconds
    budget = 40.0 if quick else 90.0
    targets = Targets(binary, model, work)
    async with _session() as session:
        try:
            await targets.start(session)
            labels = list(targets.urls)
            seq: dict[str, list[float]] = {k: [] for k in labels}
            until = time.monotonic() + budget
            for i in range(n_seq):
                if time.monotonic() > until:
                    break
                for label in _turn(labels, i):
                    url, name = targets.urls[label], targets.models[label]
                    seq[label].append(1000 * await one_token(session, url, name))
            # the same, as an Anthropic Messages request (coding agents): another API
            # through each path, and its own fast path in llamactl's front
            messages: dict[str, list[float]] = {k: [] for k in labels}
            until = time.monotonic() + budget / 2
            for i in range(n_seq // 2):
                if time.monotonic() > until:
                    break
                for label in _turn(labels, i):
                    url, name = targets.urls[label], targets.models[label]
                    spent = await one_token(session, url, name, "/v1/messages")
                    messages[label].append(1000 * spent)

            conc: dict[str, list[float]] = {k: [] for k in labels}
            rate: dict[str, list[float]] = {k: [] for k in labels}
            block_p50: dict[str, list[float]] = {k: [] for k in labels}
            until = time.monotonic() + budget
            for b in range(blocks):
                if b and time.monotonic() > until:
                    break
                for label in _turn(labels, b):
                    url, name = targets.urls[label], targets.models[label]

                    async def client(url: str = url, name: str = name) -> list[float]:
                        return [
                            1000 * await one_token(session, url, name) for _ in range(per_client)
                        ]

                    t0 = time.perf_counter()
                    lat = await asyncio.gather(*(client() for _ in range(clients)))
                    rate[label].append(clients * per_client / (time.perf_counter() - t0))
                    block = [x for one in lat for x in one]
                    conc[label] += block
                    block_p50[label].append(percentile(block, 50))

            stream, own, cpu = await _streaming(session, targets, labels, quick, budget)
        finally:
            await targets.aclose()
    d = "direct"
    rows = []
    for label in labels:
        rows.append(
            [
                label,
                fmt(spread(seq[label]), " ms", 2),
                "-" if label == d else fmt(diffs(seq[d], seq[label]), " ms", 2),
                "-" if label == d else fmt(diffs(messages[d], messages[label]), " ms", 2),
                f"p50 {percentile(conc[label], 50):.1f} / p90 {percentile(conc[label], 90):.1f} ms",
                "-" if label == d else fmt(diffs(block_p50[d], block_p50[label]), " ms", 1),
                fmt(spread(rate[label]), " req/s")
                if label == d
                else fmt(ratios(rate[d], rate[label]), "x", 3),
                fmt(spread(stream[label]), " t/s")
                if label == d
                else fmt(ratios(stream[d], stream[label]), "x", 3),
                "-" if label == d else fmt(ratios(own[label], stream[label]), "x", 3),
                "-" if label == d else _per_token(cpu[label]),
            ]
        )
    return {
        "title": "Router overhead",
        "commands": targets.commands,
        "header": [
            "path",
            f"1-token latency, sequential (n={n_seq})",
            "added vs direct (paired)",
            f"/v1/messages, added vs direct (paired, n={n_seq // 2})",
            f"{clients} concurrent clients",
            "added p50 vs direct, per block (paired)",
            "throughput (ratio vs direct)",
            "streamed tokens/s (ratio vs direct)",
            "streamed tokens/s (ratio vs its own llama-server, direct)",
            "CPU of the front process per streamed token",
        ],
        "rows": rows,
        "raw": {
            "sequential_ms": seq,
            "messages_sequential_ms": messages,
            "concurrent_ms": conc,
            "concurrent_block_p50_ms": block_p50,
            "req_per_s": rate,
            "stream": stream,
            "stream_own_server_direct": own,
            "front_cpu_us_per_token": cpu,
        },
        "notes": [
            "Each request is a non-streamed chat completion with max_tokens=1 and prompt 'Hi' "
            "(prompt cache on, as for any client), sent on a fresh loopback connection; the "
            "paths take turns request by request (sequential) or block by block "
            f"({clients} clients x {per_client} requests, {len(rate['direct'])} round(s)). "
            f"The load generator is Python in the same {os.cpu_count()}-core machine: it "
            "competes with the servers and the llamactl router for CPU.",
            "/v1/messages: the same one-token request as an Anthropic Messages call "
            "(max_tokens=1), sequential, paths in turn.",
            "'added vs direct' is the per-round difference (path - direct): median [p10-p90]; "
            "with 16 clients, the difference of each block's p50 from the direct block's.",
            "Streaming: 128 tokens (64 with --quick), ignore_eos, tokens/s after the first "
            f"token, {STREAM_ROUNDS} interleaved rounds (6), ratio per round. CPU per token: "
            "user+system seconds of the process in front of llama-server (psutil, 10 ms "
            "ticks: the total over all rounds / all tokens), llama-server's own excluded.",
            "'its own llama-server, direct': the llama-server behind that path (llamactl's "
            "child, the router-mode child, the relay's server) streamed to directly on its "
            "own port, in the same rotation: separate llama-server processes differ in speed "
            "by a few percent within a run, which the ratio to the 'direct' server charges "
            "to the path.",
            f"{RELAY}: `bench/_tcp_relay.py`, a process that passes bytes both ways between "
            "the client and a llama-server (uvloop, no HTTP parsing): the floor for any "
            "process in front of llama-server on this machine, whatever it does.",
            "Every llama-server runs with the arguments llamactl gives its own "
            f"(`{' '.join(SAME_SERVER)}`):"
            " the comparison is of the paths in front of the same server.",
        ],
    }
