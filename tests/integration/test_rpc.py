"""A model split across llama.cpp RPC workers, with the real ggml-rpc-server and llama-server.

Workers run on 127.0.0.2, 127.0.0.3, ... (every 127/8 address is this machine).
The failure tests start raw ``ggml-rpc-server`` processes so that each fault
(SIGKILL, SIGSTOP, a port nobody answers) is the test's to cause and to end;
``llamactl worker`` (ManagedWorker) has tests of its own. Each bound is measured
from the fault and printed, so the closing note can quote it; the assertions
are about what happened (how many spawns, which pids, what the client saw), and
time limits are generous timeouts, not targets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from buildtools import BuildResult
from procman.distributed.rpc import probe
from procman.distributed.worker import ManagedWorker, WorkerSpec
from procman.events import Event, State
from procman.spec import LogSettings, RestartSettings, ServerSpec
from procman.supervisor import AsyncSupervisor
from tests.integration.conftest import Processes
from tests.integration.test_serve import CLI, REPO, cli_env, demo_spec, running_router

__all__ = ["cli_env"]  # a fixture, imported to be used here

PROMPTS = [
    "Name a colour.", "What is 2 + 2?", "Say hello.", "Name a fruit.", "What is the sky?",
    "Count to three.", "Name an animal.", "What is water?", "Say goodbye.", "Name a day.",
    "What is a cat?", "Name a country.", "What is rain?", "Say yes.", "Name a tree.",
    "What is fire?", "Name a number.", "What is a book?", "Say thanks.", "Name a month.",
]  # fmt: skip


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def accepting(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def rpc_worker(default_build: BuildResult) -> Path:
    worker = default_build.build.rpc_worker
    assert worker.is_file(), "every plan builds ggml-rpc-server"
    return worker


class Workers:
    """Raw ggml-rpc-server processes on 127.0.0.N, started and faulted by the test."""

    def __init__(self, binary: Path, processes: Processes, logs: Path) -> None:
        self.binary, self.processes, self.logs = binary, processes, logs
        self.procs: dict[str, subprocess.Popen[Any]] = {}

    def start(self, endpoint: str) -> subprocess.Popen[Any]:
        host, port = endpoint.split(":")
        log = (self.logs / f"worker-{host}-{port}.log").open("ab")
        proc = self.processes.popen(
            [self.binary, "-H", host, "-p", port, "-t", "1"], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while not accepting(host, int(port)):
            assert proc.poll() is None, f"worker on {endpoint} exited {proc.returncode}"
            assert time.monotonic() < deadline, f"worker on {endpoint} did not listen"
            time.sleep(0.05)
        self.procs[endpoint] = proc
        return proc

    def endpoints(self, count: int) -> tuple[str, ...]:
        hosts = [f"127.0.0.{i}" for i in range(2, 2 + count)]
        return tuple(f"{h}:{free_port(h)}" for h in hosts)


@pytest.fixture
def workers(rpc_worker: Path, processes: Processes, tmp_path: Path) -> Workers:
    return Workers(rpc_worker, processes, tmp_path)


def group_spec(llama_server: Path, demo_model: Path, tmp_path: Path, **changes: Any) -> ServerSpec:
    spec = demo_spec(
        llama_server,
        demo_model,
        tmp_path,
        gpu_layers="all",
        startup_timeout=90.0,
        restart=RestartSettings(backoff_initial=0.1, backoff_max=1.0),
    )
    return dataclasses.replace(spec, **changes)


@pytest.fixture
async def supervisor() -> AsyncIterator[tuple[AsyncSupervisor, list[Event]]]:
    async with AsyncSupervisor() as sup:
        events: list[Event] = []
        sup.bus.subscribe(events.append)
        yield sup, events


def client(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


async def greedy(api: openai.AsyncOpenAI, prompt: str) -> str:
    answer = await api.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=16,
        temperature=0,
        seed=42,
    )
    return answer.choices[0].message.content or ""


async def until(condition: Callable[[], bool], what: str, seconds: float = 60) -> float:
    """Wait for ``condition``; returns the seconds it took (the test's measured bound)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def spawns(events: list[Event]) -> int:
    return sum(e.state is State.STARTING for e in events)


def report(**measured: object) -> None:
    """Measured bounds, printed for the closing note (pytest -s shows them)."""
    print("RPC-MEASURED " + json.dumps(measured, default=str))


# -- it works, and gives the same answers --------------------------------------------------
async def test_two_workers_and_a_leader_answer_as_one_process_does(
    llama_server: Path,
    demo_model: Path,
    tmp_path: Path,
    workers: Workers,
    supervisor: tuple[AsyncSupervisor, list[Event]],
) -> None:
    sup, _ = supervisor
    endpoints = workers.endpoints(2)
    for endpoint in endpoints:
        workers.start(endpoint)
    single = demo_spec(llama_server, demo_model, tmp_path / "single")
    (tmp_path / "single").mkdir()
    async with running_router(sup) as base:
        await sup.serve(single)
        api = client(base)
        alone = [await greedy(api, p) for p in PROMPTS]
        await sup.remove("demo")
        # -lv 4: the default verbosity hides load_tensors' buffer lines
        spec = group_spec(
            llama_server, demo_model, tmp_path, rpc=endpoints, extra_args=("-lv", "4")
        )
        await sup.serve(spec)
        split = [await greedy(api, p) for p in PROMPTS]
    log = (tmp_path / "demo.log").read_text(errors="replace")
    for index, endpoint in enumerate(endpoints):
        # devices are RPC0, RPC1, ...; each buffer is named by its worker's own device index
        assert f"using device RPC{index} ({endpoint})" in log
        assert re.search(rf"RPC\d+\[{re.escape(endpoint)}\] model buffer size", log), endpoint
    differ = [(p, a, b) for p, a, b in zip(PROMPTS, alone, split, strict=True) if a != b]
    report(greedy_prompts=len(PROMPTS), differing=len(differ), examples=differ[:3])
    assert not differ, f"{len(differ)} of {len(PROMPTS)} greedy answers differ: {differ[:3]}"


# -- failures ------------------------------------------------------------------------------
async def test_a_worker_killed_mid_stream(
    llama_server: Path,
    demo_model: Path,
    tmp_path: Path,
    workers: Workers,
    supervisor: tuple[AsyncSupervisor, list[Event]],
) -> None:
    """The stream ends with an error event; no leader spawn while the worker is down; the
    group serves again once it is back, and the abort is not counted as a crash."""
    sup, events = supervisor
    endpoints = workers.endpoints(2)
    for endpoint in endpoints:
        workers.start(endpoint)
    async with running_router(sup) as base:
        server = await sup.serve(group_spec(llama_server, demo_model, tmp_path, rpc=endpoints))
        api = client(base)
        stream = await api.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "Tell a long story."}],
            max_tokens=400,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        pieces = 0
        killed_at = 0.0
        with pytest.raises(openai.APIError, match="incomplete"):
            async for _ in stream:
                pieces += 1
                if pieces == 3:
                    workers.procs[endpoints[1]].kill()
                    killed_at = time.monotonic()
        ended = time.monotonic() - killed_at
        waiting = await until(
            lambda: server.state is State.WAITING_WORKERS, "the group to wait for its worker"
        )
        before = spawns(events)
        await asyncio.sleep(3.0)  # the worker stays down: nothing may be spawned meanwhile
        assert spawns(events) == before, "a leader was spawned while its worker was down"
        workers.start(endpoints[1])
        back_at = time.monotonic()
        await until(lambda: server.state is State.READY, "the group to serve again", 60)
        recovered = time.monotonic() - back_at
        assert await greedy(api, "Say hello.")
    assert server.policy.recent_crashes == 0, "a lost worker is not the leader's crash"
    report(
        kill_to_stream_end_s=round(ended, 2),
        kill_to_waiting_workers_s=round(ended + waiting, 2),
        worker_back_to_ready_s=round(recovered, 2),
        spawns_while_down=spawns(events) - before - 1,
    )


async def test_a_silent_worker_is_caught_by_the_stall_watchdog(
    llama_server: Path,
    demo_model: Path,
    rpc_worker: Path,
    tmp_path: Path,
    workers: Workers,
    supervisor: tuple[AsyncSupervisor, list[Event]],
) -> None:
    """SIGSTOP of a worker mid-answer: the watchdog sees no progress and restarts the
    group, which waits for the worker; after SIGCONT the same worker process serves the
    next leader. The silent one runs under ``llamactl worker`` (ManagedWorker): a bare
    ggml-rpc-server b11312 dies of SIGPIPE at SIGCONT, writing to its vanished leader."""
    sup, events = supervisor
    endpoints = workers.endpoints(2)
    host, port = endpoints[0].split(":")
    managed = ManagedWorker(
        WorkerSpec(
            binary=rpc_worker, host=host, port=int(port), threads=1,
            log=LogSettings(directory=tmp_path),
        )
    )  # fmt: skip
    workers.start(endpoints[1])
    spec = group_spec(llama_server, demo_model, tmp_path, rpc=endpoints, stall_timeout=3.0)
    async with managed, running_router(sup) as base:
        silent = managed.pid
        assert silent is not None
        server = await sup.serve(spec)
        api = client(base)
        request = asyncio.ensure_future(
            api.chat.completions.create(
                model="demo",
                messages=[{"role": "user", "content": "Tell a long story."}],
                max_tokens=400,
                extra_body={"ignore_eos": True},
            )
        )
        await until(lambda: server.state is State.READY and sup.status()[0]["in_use"] > 0, "busy")
        await asyncio.sleep(0.5)  # generating
        os.kill(silent, signal.SIGSTOP)
        stopped_at = time.monotonic()
        await until(
            lambda: any("stalled" in e.reason for e in events), "the watchdog to restart it", 60
        )
        detected = time.monotonic() - stopped_at
        with pytest.raises(openai.APIError):
            await request
        await until(lambda: server.state is State.WAITING_WORKERS, "waiting for the worker")
        os.kill(silent, signal.SIGCONT)
        resumed_at = time.monotonic()
        await until(lambda: server.state is State.READY, "recovery after SIGCONT", 60)
        recovered = time.monotonic() - resumed_at
        assert await greedy(api, "Say hello.")
        assert managed.pid == silent and managed.restarts == 0, "the worker itself survived"
    report(sigstop_to_restart_s=round(detected, 2), sigcont_to_ready_s=round(recovered, 2))


async def test_the_leader_killed_reuses_its_workers(
    llama_server: Path,
    demo_model: Path,
    tmp_path: Path,
    workers: Workers,
    supervisor: tuple[AsyncSupervisor, list[Event]],
) -> None:
    sup, _ = supervisor
    endpoints = workers.endpoints(2)
    pids = {e: workers.start(e).pid for e in endpoints}
    async with running_router(sup) as base:
        server = await sup.serve(group_spec(llama_server, demo_model, tmp_path, rpc=endpoints))
        leader = server.pid
        assert leader is not None
        os.kill(leader, signal.SIGKILL)
        killed_at = time.monotonic()
        await until(lambda: server.pid not in (None, leader), "a new leader")
        await until(lambda: server.state is State.READY, "the new leader ready", 60)
        ready = time.monotonic() - killed_at
        assert await greedy(client(base), "Say hello.")
    assert {e: p.pid for e, p in workers.procs.items()} == pids, "the workers were not restarted"
    assert all(p.poll() is None for p in workers.procs.values())
    report(leader_sigkill_to_ready_s=round(ready, 2))


def test_an_unreachable_worker_at_start_is_a_clear_error(
    llama_server: Path, demo_model: Path, cli_env: dict[str, str], tmp_path: Path
) -> None:
    gone = f"127.0.0.2:{free_port('127.0.0.2')}"
    started = time.monotonic()
    done = subprocess.run(
        [*CLI, "serve", str(demo_model), "--server", str(llama_server), "--port", "0",
         "--rpc", gone],
        cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert gone in done.stderr and "unreachable" in done.stderr
    assert "Traceback" not in done.stderr
    # nothing spawned: no llama-server to abort on the missing worker, so no core and no orphan
    logs = Path(cli_env["LLAMACTL_HOME"]) / "logs"
    assert not any("llama-server" in f.read_text() for f in logs.glob("*.log")), "spawned"
    report(unreachable_exit_s=round(time.monotonic() - started, 2))


@pytest.fixture
def other_protocol() -> Any:
    """A fake worker speaking RPC protocol 8.0.0, in a thread of its own."""
    import threading

    server = socket.create_server(("127.0.0.3", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(9 + 24)
                conn.sendall((28).to_bytes(8, "little") + bytes([8, 0, 0, 0]) + bytes(24))
                conn.recv(1)

    threading.Thread(target=serve, daemon=True).start()
    yield f"127.0.0.3:{port}"
    server.close()


def test_a_worker_of_another_protocol_version_names_both(
    llama_server: Path, demo_model: Path, cli_env: dict[str, str], other_protocol: str
) -> None:
    done = subprocess.run(
        [*CLI, "serve", str(demo_model), "--server", str(llama_server), "--port", "0",
         "--rpc", other_protocol],
        cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "8.0.0" in done.stderr and "7.0.0" in done.stderr and other_protocol in done.stderr
    listed = subprocess.run(
        [*CLI, "workers", other_protocol, "--json"],
        cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert listed.returncode == 1
    (entry,) = json.loads(listed.stdout)
    assert entry["protocol"] == "8.0.0" and not entry["usable"]


# -- llamactl worker -------------------------------------------------------------------------
def test_a_busy_worker_port_is_a_clear_error_before_spawning(
    rpc_worker: Path, cli_env: dict[str, str]
) -> None:
    with socket.create_server(("127.0.0.2", 0)) as busy:
        port = busy.getsockname()[1]
        done = subprocess.run(
            [*CLI, "worker", "--host", "127.0.0.2", "--port", str(port),
             "--server", str(rpc_worker)],
            cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"port {port} on 127.0.0.2 is already in use" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["worker", "--host", "0.0.0.0"], "no authentication"),
        (["serve", "missing.gguf", "--rpc", "10.9.8.7:50052", "--port", "0"], "--trusted-network"),
    ],
)
def test_the_network_is_refused_unless_the_user_says_so(
    argv: list[str], says: str, cli_env: dict[str, str], rpc_worker: Path
) -> None:
    done = subprocess.run(
        [*CLI, *argv], cwd=REPO, env=cli_env | {"LLAMACTL_RPC_SERVER": str(rpc_worker)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr


async def test_llamactl_worker_serves_restarts_and_reports(
    rpc_worker: Path, cli_env: dict[str, str], processes: Processes
) -> None:
    """The supervised worker: status endpoint, busy while a leader holds it, restarted when
    killed, the Host rule on its status endpoint, no orphan after SIGTERM."""
    import aiohttp

    port = free_port("127.0.0.2")
    proc = processes.popen(
        [*CLI, "worker", "--host", "127.0.0.2", "--port", str(port), "--server", str(rpc_worker)],
        cwd=REPO, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    status_url = f"http://127.0.0.2:{port + 1}/status"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

        async def status(**headers: str) -> tuple[int, dict[str, Any]]:
            try:
                async with session.get(status_url, headers=headers) as resp:
                    return resp.status, await resp.json()
            except aiohttp.ClientError:
                return 0, {}

        deadline = time.monotonic() + 60
        while (await status())[0] != 200:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "llamactl worker did not come up"
            await asyncio.sleep(0.1)
        _, doc = await status()
        assert doc["state"] == "ready" and doc["protocol"] == "7.0.0"
        assert doc["devices"][0]["name"] == "CPU" and doc["devices"][0]["total"] > 0
        assert (await status(Host="evil.example"))[0] == 403
        found = await probe(f"127.0.0.2:{port}")
        assert found.usable and found.protocol == (7, 0, 0)
        # a leader holds it: busy, and `workers` says so without waiting on the RPC port
        held = socket.create_connection(("127.0.0.2", port))
        await asyncio.sleep(0.3)
        assert (await status())[1]["busy"] is True
        listed = await asyncio.to_thread(
            subprocess.run,
            [*CLI, "workers", f"127.0.0.2:{port}", "--json"],
            cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        held.close()
        assert listed.returncode == 1 and json.loads(listed.stdout)[0]["busy"] is True
        # killed: restarted by llamactl worker on the same port
        first = doc["pid"]
        os.kill(first, signal.SIGKILL)
        killed_at = time.monotonic()
        while (doc := (await status())[1]).get("pid") in (None, first) or doc["state"] != "ready":
            assert time.monotonic() - killed_at < 30, "the worker was not restarted"
            await asyncio.sleep(0.05)
        report(worker_sigkill_to_ready_s=round(time.monotonic() - killed_at, 2))
        assert doc["restarts"] == 1
        second = doc["pid"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)
    if sys.platform.startswith("linux"):
        assert not accepting("127.0.0.2", port)


# -- three workers: llama.cpp#28487 ----------------------------------------------------------
async def test_three_workers_for_a_minute(
    llama_server: Path,
    demo_model: Path,
    tmp_path: Path,
    workers: Workers,
    supervisor: tuple[AsyncSupervisor, list[Event]],
) -> None:
    """Upstream has an open deadlock report for three or more workers. Requests run for
    60 s; whether it hung, and how the watchdog recovered, is recorded (README, known
    limits); what must hold is that the group serves at the end."""
    sup, events = supervisor
    endpoints = workers.endpoints(3)
    for endpoint in endpoints:
        workers.start(endpoint)
    spec = group_spec(llama_server, demo_model, tmp_path, rpc=endpoints, stall_timeout=5.0)
    ok = failed = 0
    async with running_router(sup) as base:
        server = await sup.serve(spec)
        api = client(base)
        started = time.monotonic()
        while time.monotonic() - started < 60:
            try:
                await asyncio.wait_for(greedy(api, PROMPTS[ok % len(PROMPTS)]), 30)
                ok += 1
            except (openai.APIError, TimeoutError):
                failed += 1
        await until(lambda: server.state is State.READY, "the group to serve at the end", 90)
        assert await greedy(api, "Say hello.")
    stalls = [e.reason for e in events if "stalled" in e.reason]
    report(
        three_workers_requests_ok=ok, failed=failed, stalls=len(stalls), restarts=server.restarts
    )
    assert ok > 0


# -- the worker's tensor cache over a slow link -----------------------------------------------
def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def slow_link(tmp_path: Path) -> Any:
    """A network namespace behind a 100 Mbit/s veth link: a worker "on another machine"."""
    if os.geteuid() != 0 or (not Path("/usr/sbin/tc").exists() and not Path("/sbin/tc").exists()):
        pytest.skip("needs root and tc to make a network namespace with a rate-limited link")
    name = f"llamactl-t{os.getpid()}"
    host_if, ns_if = f"lh{os.getpid() % 100000}", f"lw{os.getpid() % 100000}"
    try:
        _ip("netns", "add", name)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"network namespaces are not allowed here: {exc.stderr.decode().strip()}")
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", name)
        _ip("addr", "add", "10.213.77.1/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", name, "addr", "add", "10.213.77.2/30", "dev", ns_if)
        _ip("-n", name, "link", "set", ns_if, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        subprocess.run(
            ["tc", "qdisc", "add", "dev", host_if, "root", "tbf", "rate", "100mbit",
             "burst", "64kb", "latency", "400ms"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        yield name, host_if, "10.213.77.2"
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)


async def test_the_worker_cache_over_a_slow_link(
    llama_server: Path,
    demo_model: Path,
    rpc_worker: Path,
    tmp_path: Path,
    processes: Processes,
    slow_link: tuple[str, str, str],
    supervisor: tuple[AsyncSupervisor, list[Event]],
) -> None:
    """``--cache``: the second load sends hashes for tensors over 10 MiB instead of their
    bytes. On the demo model only the tied output head (token_embd, ~30 MB) qualifies."""
    sup, _ = supervisor
    namespace, host_if, address = slow_link
    cache = tmp_path / "llama-cache"
    log = (tmp_path / "worker.log").open("ab")
    processes.popen(
        ["ip", "netns", "exec", namespace, str(rpc_worker), "-H", address, "-p", "50052", "-c"],
        env={**os.environ, "LLAMA_CACHE": str(cache)}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    endpoint = f"{address}:50052"
    deadline = time.monotonic() + 30
    while not (await probe(endpoint, timeout=1)).usable:
        assert time.monotonic() < deadline, "the worker in the namespace did not answer"
        await asyncio.sleep(0.1)
    sent = Path(f"/sys/class/net/{host_if}/statistics/tx_bytes")

    def sent_bytes() -> int:
        return int(sent.read_text())  # a sysfs counter: no real I/O

    loads = []
    for _ in range(2):
        before, started = sent_bytes(), time.monotonic()
        await sup.serve(group_spec(llama_server, demo_model, tmp_path, rpc=(endpoint,)))
        loads.append((time.monotonic() - started, sent_bytes() - before))
        await sup.remove("demo")
    (cold_s, cold_bytes), (warm_s, warm_bytes) = loads
    cached = [f for f in cache.rglob("*") if f.is_file()]
    report(
        cache_cold_load_s=round(cold_s, 2), cache_cold_mb=round(cold_bytes / 1e6, 1),
        cache_warm_load_s=round(warm_s, 2), cache_warm_mb=round(warm_bytes / 1e6, 1),
        cached_files=len(cached),
    )  # fmt: skip
    assert cached and all(f.stat().st_size > 10 * 1024 * 1024 for f in cached)
    assert cold_bytes - warm_bytes > 20e6, "the warm load sent the cached tensor again"
