"""Replicas: what a router in front of remote replicas costs, and what prefix picking buys.

* picking cost: ``ReplicaSet.pick`` for an 8 KB prompt, per policy (in process);
* added latency: one-token requests straight to a replica (``llamactl serve`` on
  127.0.0.2) vs through a router (``llamactl serve --config`` with a
  ``[remote.chat]`` table) in front of it, interleaved, paired per round;
* throughput of 16 clients on one replica vs two (CPU replicas share this
  machine's cores: on one machine two replicas cannot be faster; the figure
  that matters needs two machines or a GPU each);
* prompt-cache hit rate (llama-server's own counters) and first-token latency
  of interleaved conversations with long system prompts, ``prefix`` vs
  ``round_robin``.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
from _common import (  # first: it puts the repository on sys.path
    LLAMACTL,
    Section,
    _session,
    cmdline,
    diffs,
    fmt,
    healthy,
    launched,
    one_token,
    spread,
    wait_until,
)

from procman.distributed.remote import Pick, RemoteSection
from procman.process._sockets import pick_free_port
from procman.router.replicas import ReplicaSet


def picking_cost(rounds: int = 2_000, batches: int = 10) -> dict[str, float]:
    """Microseconds per pick of an 8 KB chat prompt, by policy: the mean over the quietest of
    ``batches`` batches (other jobs share these cores; their noise only ever adds)."""
    system = "You are a careful assistant. " * 300  # ~8.4 KB
    payload = {"model": "chat", "messages": [{"role": "system", "content": system[:8192]},
                                             {"role": "user", "content": "hello"}]}  # fmt: skip
    urls = ("http://10.0.0.2:8080", "http://10.0.0.3:8080", "http://10.0.0.4:8080")
    costs = {}
    for pick in Pick:
        remote = ReplicaSet("chat", RemoteSection(replicas=urls, pick=pick))
        headers = [("x-session-id", "abc")]
        best = float("inf")
        for _ in range(batches):
            t0 = time.perf_counter()
            for _ in range(rounds):
                remote.pick(payload, headers)
            best = min(best, (time.perf_counter() - t0) / rounds * 1e6)
        costs[str(pick)] = best
    return costs


async def _throughput(base: str, clients: int = 16, each: int = 4) -> float:
    body = {"model": "chat", "messages": [{"role": "user", "content": "Count to five."}],
            "max_tokens": 16, "temperature": 0}  # fmt: skip

    async def client(http: aiohttp.ClientSession) -> int:
        tokens = 0
        for _ in range(each):
            async with http.post(f"{base}/v1/chat/completions", json=body) as r:
                tokens += (await r.json())["usage"]["completion_tokens"]
        return tokens

    async with aiohttp.ClientSession() as http:
        t0 = time.perf_counter()
        total = sum(await asyncio.gather(*(client(http) for _ in range(clients))))
    return total / (time.perf_counter() - t0)


async def _cache_run(
    base: str, replicas: list[str], tag: str, conversations: int = 3, turns: int = 3
) -> tuple[float, list[float]]:
    """Interleaved conversations through ``base``: the replicas' cache hit rate (counter
    deltas) and the first-token latencies of the later turns."""

    async def counters(http: aiohttp.ClientSession) -> tuple[float, float]:
        total = cached = 0.0
        for url in replicas:
            async with http.get(f"{url}/metrics?model=chat") as r:
                for line in (await r.text()).splitlines():
                    name, _, value = line.partition(" ")
                    if name == "llamacpp:prompt_tokens_total":
                        total += float(value)
                    elif name == "llamacpp:prompt_tokens_cached_total":
                        cached += float(value)
        return total, cached

    history = [[{"role": "system", "content": f"You are assistant {tag} number {c}. " + " ".join(
        f"Rule {c}.{i}: answer briefly and politely." for i in range(30))}]
        for c in range(conversations)]  # fmt: skip
    latencies = []
    async with aiohttp.ClientSession() as http:
        before = await counters(http)
        for turn in range(turns):
            for c in range(conversations):
                history[c].append({"role": "user", "content": f"Question {turn}: a colour?"})
                body = {"model": "chat", "messages": history[c], "max_tokens": 4,
                        "temperature": 0, "stream": True}  # fmt: skip
                t0 = time.perf_counter()
                first = None
                async with http.post(f"{base}/v1/chat/completions", json=body) as r:
                    async for _ in r.content.iter_any():
                        first = first or time.perf_counter() - t0
                if turn:
                    latencies.append(first or 0.0)
                history[c].append({"role": "assistant", "content": "blue"})
        after = await counters(http)
    cached, evaluated = after[1] - before[1], after[0] - before[0]
    return cached / max(cached + evaluated, 1), latencies


async def replicas_section(binary: Path, model: Path, work: Path, quick: bool) -> Section:
    env = {"LLAMACTL_SERVER": str(binary), "LLAMACTL_HOME": str(work / "home"),
           "LLAMACTL_LOG": "WARNING"}  # fmt: skip
    hosts = ["127.0.0.2", "127.0.0.3"]
    ports = [pick_free_port(h) for h in hosts]
    urls = [f"http://{h}:{p}" for h, p in zip(hosts, ports, strict=True)]
    replica_argv = [
        [*LLAMACTL, "serve", str(model), "--host", h, "--port", str(p), "--ctx", "4096",
         "--parallel", "2", "--metrics", "--cache-ram", "256", "--threads", "1"]
        for h, p in zip(hosts, ports, strict=True)
    ]  # fmt: skip
    fronts = {}
    setups = (("one", urls[:1], "least_loaded"), ("two", urls, "least_loaded"),
              ("prefix", urls, "prefix"), ("rr", urls, "round_robin"))  # fmt: skip
    for name, replicas, pick in setups:
        config = work / f"{name}.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(f'[remote.chat]\nreplicas = {json.dumps(replicas)}\npick = "{pick}"\n')
        port = pick_free_port("127.0.0.1")
        fronts[name] = ([*LLAMACTL, "serve", "--config", str(config), "--port", str(port)],
                        f"http://127.0.0.1:{port}")  # fmt: skip
    rounds = 30 if quick else 300
    costs = picking_cost()
    with (
        launched(replica_argv[0], work / "replica-a.log", env) as a,
        launched(replica_argv[1], work / "replica-b.log", env) as b,
        launched(fronts["one"][0], work / "one.log", env) as f1,
        launched(fronts["two"][0], work / "two.log", env) as f2,
        launched(fronts["prefix"][0], work / "prefix.log", env) as f3,
        launched(fronts["rr"][0], work / "rr.log", env) as f4,
    ):
        async with _session() as http:
            for proc, base in ((a, urls[0]), (b, urls[1]), (f1, fronts["one"][1]),
                               (f2, fronts["two"][1]), (f3, fronts["prefix"][1]),
                               (f4, fronts["rr"][1])):  # fmt: skip
                await wait_until(lambda base=base: healthy(http, base), proc)
            for base in (urls[0], fronts["one"][1]):  # warm: the model loads, pools fill
                await wait_until(lambda base=base: _ok(http, base), a)
            direct, routed = [], []
            for i in range(rounds):
                pair = [(direct, urls[0]), (routed, fronts["one"][1])]
                for sink, base in pair if i % 2 else pair[::-1]:
                    sink.append(await one_token(http, base, "chat") * 1000)
        ones, twos = [], []
        for i in range(2 if quick else 4):  # interleaved: others' load falls on both
            order = [(ones, "one"), (twos, "two")]
            for sink, name in order if i % 2 else order[::-1]:
                sink.append(await _throughput(fronts[name][1]))
        rr_rate, rr_first = await _cache_run(fronts["rr"][1], urls, "alpha")
        prefix_rate, prefix_first = await _cache_run(fronts["prefix"][1], urls, "beta")
    added = diffs(direct, routed)
    rows = [
        ["one-token request, straight to the replica (ms)", fmt(spread(direct), digits=2)],
        ["the same through a router in front (ms)", fmt(spread(routed), digits=2)],
        ["router's added latency, paired per round (ms)", fmt(added, digits=2)],
        *[[f"picking cost, 8 KB prompt, `{k}` (µs per request)", f"{v:.1f}"]
          for k, v in costs.items()],
        ["16 clients, one replica (tokens/s)", fmt(spread(ones))],
        ["16 clients, two replicas on the same machine (tokens/s)", fmt(spread(twos))],
        ["prompt-cache hit rate, `round_robin`", f"{rr_rate:.1%}"],
        ["prompt-cache hit rate, `prefix`", f"{prefix_rate:.1%}"],
        ["first token, later turns, `round_robin` (ms)",
         fmt(spread([x * 1000 for x in rr_first]), digits=0)],
        ["first token, later turns, `prefix` (ms)",
         fmt(spread([x * 1000 for x in prefix_first]), digits=0)],
    ]  # fmt: skip
    return {
        "title": "Replicas: a router in front of remote `llamactl serve` replicas",
        "commands": {
            "replica": cmdline(replica_argv[0]),
            "router": cmdline(fronts["one"][0]) + " (a `[remote.chat]` table: the replica URLs)",
        },
        "header": ["measure", "value"],
        "rows": rows,
        "raw": {
            "direct_ms": direct,
            "routed_ms": routed,
            "pick_us": costs,
            "one_tps": ones,
            "two_tps": twos,
        },
        "notes": [
            "Each replica's llama-server runs one thread (`--threads 1`), so on this "
            "2-core machine two replicas have a core each, as on two machines; the routers "
            "and other jobs on the machine share those cores too.",
            "Hit rate: llama-server's own `prompt_tokens_cached_total` / (that + "
            "`prompt_tokens_total`: llama.cpp counts evaluated and cached tokens apart), "
            "deltas over 3 interleaved conversations x 3 turns, each with a ~350-token system "
            "prompt, on 2 replicas with 2 slots and `--cache-ram 256` each.",
        ],
    }


async def _ok(http: aiohttp.ClientSession, base: str) -> bool:
    await one_token(http, base, "chat")
    return True
