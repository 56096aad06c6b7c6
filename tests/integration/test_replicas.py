"""A model served by replicas, for real: two ``llamactl serve`` on 127.0.0.2 and 127.0.0.3.

Each replica is the real CLI running the real llama-server with the demo
model, keyed with a key the clients do not know: the router must put the
replicas' key in place of the client's. Checked: the share of each replica
under 16 concurrent clients, prefix affinity against llama-server's own
prompt-cache counters (vs round robin), a replica SIGKILLed under load (no
failed request, ejected at once, a stream on it ended with an error event,
readmitted when it is back), a replica that goes silent (SIGSTOP: it accepts
connections and answers nothing, as behind a link that went down), two router
processes agreeing on the replica for 1,000 prefixes, DNS discovery against a
DNS server the test runs, and ``ps``/``/metrics``.
The router's added latency and the picking cost are the bench's (``python
bench/suite.py --only replicas``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest

from procman.distributed.discovery import Discovery
from procman.distributed.remote import Pick, RemoteSection
from procman.router import Router, RouterSettings
from procman.router.listen import bind_listener
from procman.router.replicas import ReplicaSet, ReplicaSets
from procman.router.scheduler import Scheduler
from procman.supervisor import AsyncSupervisor
from tests.conftest import shared_env
from tests.integration.conftest import Processes

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "procman.cli"]
KEY = "client-key"
REPLICA_KEY = "replica-key"
KEY_ENV = "LLAMACTL_TEST_REPLICA_KEY"


def free_port(host: str) -> int:
    sock = bind_listener(host, 0)
    port = int(sock.getsockname()[1])
    sock.close()
    return port


def same_free_port(*hosts: str) -> int:
    """A port free on every one of ``hosts`` right now."""
    while True:
        port = free_port(hosts[0])
        try:
            for host in hosts[1:]:
                bind_listener(host, port).close()
        except OSError:
            continue
        return port


def health(url: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:  # noqa: S310 - loopback
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


@dataclass
class Replica:
    host: str
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def start(
    replica: Replica, llama_server: Path, model: Path, home: Path, popen: object, *, shared: bool
) -> None:
    """``llamactl serve`` on the replica's address, keyed, with llama-server's ``--metrics``,
    a prompt cache in RAM, and one thread: two replicas on two cores then run at the same
    speed (``least_loaded`` rightly gives a faster replica more, which is not what the share
    test is about)."""
    env = {**os.environ, "LLAMACTL_HOME": str(home), "LLAMACTL_LOG": "WARNING",
           "LLAMACTL_SERVER": str(llama_server), "LLAMACTL_API_KEY": REPLICA_KEY}  # fmt: skip
    argv = [*CLI, "serve", str(model), "--host", replica.host, "--port", str(replica.port),
            "--ctx", "4096", "--parallel", "2", "--metrics", "--cache-ram", "256",
            "--threads", "1"]  # fmt: skip
    log = (home / f"serve-{replica.host}.log").open("ab")
    replica.proc = popen(  # type: ignore[operator]
        argv, cwd=REPO, env=shared_env(env) if shared else env, stdout=log, stderr=log
    )
    deadline = time.monotonic() + 120
    while health(replica.url) != 200:
        assert replica.proc is not None
        if replica.proc.poll() is not None:
            raise AssertionError((home / f"serve-{replica.host}.log").read_text()[-3000:])
        assert time.monotonic() < deadline, f"{replica.url} not healthy in 120 s"
        time.sleep(0.1)  # polling another process's port: there is no event to wait on


@pytest.fixture(scope="module")
def pair(
    llama_server: Path, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Replica]]:
    """Two replicas kept for the module (each start costs seconds on 2 cores)."""
    home = tmp_path_factory.mktemp("replicas")
    shared = Processes()
    port = same_free_port("127.0.0.2", "127.0.0.3")  # as pods: one port, one address each
    replicas = [Replica("127.0.0.2", port), Replica("127.0.0.3", port)]
    try:
        for each in replicas:
            start(each, llama_server, demo_model, home, shared.popen, shared=True)
        yield replicas
    finally:
        shared.stop_all()


@dataclass
class Front:
    remote: ReplicaSet
    base: str

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key=KEY, max_retries=0,
                                  timeout=120)  # fmt: skip


@contextlib.asynccontextmanager
async def front(urls: list[str], **settings: object) -> AsyncIterator[Front]:
    """A router in this process whose model ``chat`` is served by ``urls``."""
    section = RemoteSection(replicas=tuple(urls), replica_api_key_env=KEY_ENV, **settings)  # type: ignore[arg-type]
    sets = ReplicaSets.configured({"chat": section}, scheduler := Scheduler())
    remote = sets.sets[0]
    assert remote.api_key == REPLICA_KEY  # from the environment variable the section names
    supervisor = AsyncSupervisor()
    router = Router(supervisor, RouterSettings(api_key=KEY), scheduler=scheduler, replicas=sets)
    try:
        await sets.start()
        await router.start(bind_listener("127.0.0.1", 0))
        assert router.address is not None
        yield Front(remote, f"http://127.0.0.1:{router.address[1]}")
    finally:
        await router.stop()
        await sets.stop()
        await supervisor.stop()


async def ask(client: openai.AsyncOpenAI, text: str = "Count to three.") -> str:
    answer = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": text}], max_tokens=4, temperature=0
    )
    return answer.choices[0].message.content or ""


async def until(check: object, timeout: float = 30) -> float:  # noqa: ASYNC109
    """Poll a condition in a test; returns the seconds it took."""
    started = time.monotonic()
    while not callable(check) or not check():
        assert time.monotonic() - started < timeout, f"condition not reached in {timeout:g} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.fixture(autouse=True)
def _replica_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, REPLICA_KEY)


# -- tests --------------------------------------------------------------------------------------
async def test_sixteen_clients_share_two_replicas_evenly(pair: list[Replica]) -> None:
    async with front([r.url for r in pair]) as fr:
        client = fr.client()

        async def worker(i: int) -> None:
            for turn in range(3):
                assert await ask(client, f"Client {i}, turn {turn}: count to three.")

        await asyncio.gather(*(worker(i) for i in range(16)))
        counts = [r.requests for r in fr.remote.replicas]
        print(f"requests per replica, 16 clients x 3: {counts}")
        assert sum(counts) == 48
        for count in counts:
            assert 0.40 <= count / 48 <= 0.60, counts
        assert all(r.failures == 0 and r.up for r in fr.remote.replicas)
        # the replicas did the work: their engines' own counters say so
        await fr.remote.probe_all()
        assert all((r.prompt_tokens or 0) > 0 for r in fr.remote.replicas)
        # the client's key is never forwarded: a replica refuses it
        async with aiohttp.ClientSession() as http:
            body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
            headers = {"Authorization": f"Bearer {KEY}"}
            async with http.post(f"{pair[0].url}/v1/chat/completions", json=body,
                                 headers=headers) as resp:  # fmt: skip
                assert resp.status == 401


async def test_status_metrics_and_ps_show_each_replica(pair: list[Replica]) -> None:
    async with front([r.url for r in pair]) as fr:
        assert await ask(fr.client())
        await fr.remote.probe_all()
        headers = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.get(f"{fr.base}/admin/status") as resp:
                status = await resp.json()
            async with http.get(f"{fr.base}/metrics") as resp:
                metrics = await resp.text()
            async with http.get(f"{fr.base}/v1/models") as resp:
                models = await resp.json()
        (row,) = status["remote"]
        assert [r["url"] for r in row["replicas"]] == [r.url for r in pair]
        assert {r["state"] for r in row["replicas"]} == {"up"}
        assert sum(r["requests"] for r in row["replicas"]) == 1
        assert row["pick_seconds_mean"] > 0
        for each in pair:
            assert f'llamactl_replica_up{{model="chat",replica="{each.url}"}} 1' in metrics
        assert "llamactl_replica_prompt_tokens_cached_total" in metrics
        assert [m["id"] for m in models["data"]] == ["chat"]
        env = {**os.environ, "LLAMACTL_URL": fr.base, "LLAMACTL_API_KEY": KEY, "COLUMNS": "300"}
        proc = await asyncio.create_subprocess_exec(
            *CLI, "ps", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        for each in pair:
            assert each.url in out.decode()


async def hit_rate(
    fr: Front, tag: str, conversations: int = 3, turns: int = 3
) -> tuple[float, float]:
    """Interleaved conversations with long system prompts: the share of prompt tokens the
    replicas' engines served from their caches (their counters' deltas), and the mean
    first-token latency of the later turns. An odd number of conversations, so that round
    robin sends a conversation's next turn to the other replica."""
    await fr.remote.probe_all()
    before = [(r.prompt_tokens or 0, r.prompt_tokens_cached or 0) for r in fr.remote.replicas]
    client = fr.client()
    history: list[list[dict[str, str]]] = [
        [{"role": "system", "content": f"You are assistant {tag} number {c}. "
          + " ".join(f"Rule {c}.{i}: answer briefly and politely." for i in range(30))}]
        for c in range(conversations)
    ]  # fmt: skip
    latencies = []
    for turn in range(turns):
        for c in range(conversations):
            history[c].append({"role": "user", "content": f"Question {turn}: name a colour."})
            started = time.monotonic()
            stream = await client.chat.completions.create(
                model="chat",
                messages=history[c],
                max_tokens=4,
                temperature=0,
                stream=True,  # type: ignore[arg-type]
            )
            first: float | None = None
            text = ""
            async for chunk in stream:
                if first is None:
                    first = time.monotonic() - started
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
            if turn:
                latencies.append(first or 0.0)
            history[c].append({"role": "assistant", "content": text})
    await fr.remote.probe_all()
    after = [(r.prompt_tokens or 0, r.prompt_tokens_cached or 0) for r in fr.remote.replicas]
    evaluated = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    cached = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    assert evaluated > 0
    return cached / (evaluated + cached), sum(latencies) / len(latencies)


async def test_prefix_picking_keeps_conversations_on_their_cache(pair: list[Replica]) -> None:
    urls = [r.url for r in pair]
    async with front(urls, pick=Pick.ROUND_ROBIN) as fr:
        spread, spread_latency = await hit_rate(fr, "alpha")
    async with front(urls, pick=Pick.PREFIX) as fr:
        affine, affine_latency = await hit_rate(fr, "beta")
    print(f"prompt cache hit rate: prefix {affine:.1%} ({affine_latency * 1000:.0f} ms to the "
          f"first token), round_robin {spread:.1%} ({spread_latency * 1000:.0f} ms)")  # fmt: skip
    assert affine > spread


async def test_two_router_processes_agree_on_the_replica(
    pair: list[Replica], tmp_path: Path, processes: Processes
) -> None:
    config = tmp_path / "models.toml"
    urls = json.dumps([r.url for r in pair])
    config.write_text(f'[remote.chat]\nreplicas = {urls}\npick = "prefix"\n'
                      f'replica_api_key_env = "{KEY_ENV}"\n')  # fmt: skip
    bases = []
    env = {**os.environ, "LLAMACTL_HOME": str(tmp_path / "home"), "LLAMACTL_API_KEY": KEY}
    for _ in range(2):
        port = free_port("127.0.0.1")
        argv = [*CLI, "serve", "--config", str(config), "--port", str(port)]
        quiet = subprocess.DEVNULL
        processes.popen(argv, cwd=REPO, env=env, stdout=quiet, stderr=quiet)
        bases.append(f"http://127.0.0.1:{port}")
    for base in bases:
        await until(lambda base=base: health(base) == 200, 60)
    same = 0
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        for i in range(1000):
            body = {"model": "chat", "messages": [
                {"role": "system", "content": f"Prompt {i}: " + "be helpful. " * 20},
                {"role": "user", "content": "hello"}]}  # fmt: skip
            picked = []
            for base in bases:
                async with http.post(f"{base}/admin/pick/chat", json=body) as resp:
                    assert resp.status == 200
                    picked.append((await resp.json())["replica"])
            same += picked[0] == picked[1] and picked[0] is not None
    assert same >= 950, same


async def test_a_sigkilled_replica_fails_no_request_and_comes_back(
    llama_server: Path, demo_model: Path, tmp_path: Path, processes: Processes
) -> None:
    replicas = [Replica("127.0.0.2", free_port("127.0.0.2")),
                Replica("127.0.0.3", free_port("127.0.0.3"))]  # fmt: skip
    for each in replicas:
        start(each, llama_server, demo_model, tmp_path, processes.popen, shared=False)
    # ramp = 0: a readmitted replica takes a full share at once (the ramp is a unit test's)
    async with front([r.url for r in replicas], ramp=0) as fr, front([replicas[0].url]) as solo:
        client = fr.client()
        failures: list[BaseException] = []
        done = 0
        stop = asyncio.Event()

        async def worker() -> None:
            nonlocal done
            while not stop.is_set():
                try:
                    assert await ask(client)
                    done += 1
                except Exception as exc:
                    failures.append(exc)

        workers = [asyncio.create_task(worker()) for _ in range(8)]
        await until(lambda: done >= 8, 60)
        victim, watched = replicas[0], fr.remote.replicas[0]
        assert victim.proc is not None
        # a stream on the victim alone (its own router): cut mid-way, it must end cleanly
        body = {"model": "chat", "messages": [{"role": "user", "content": "Tell a story."}],
                "max_tokens": 2000, "stream": True, "ignore_eos": True}  # fmt: skip
        http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"})
        stream = await http.post(f"{solo.base}/v1/chat/completions", json=body)
        assert stream.status == 200
        first = await stream.content.readany()
        assert first.startswith(b"data: ")
        killed_at = time.monotonic()
        os.killpg(victim.proc.pid, signal.SIGKILL)
        rest = await asyncio.wait_for(stream.content.read(), 30)  # no payload error: it ended
        await http.close()
        assert b'"code": "upstream_error"' in rest[-400:]  # the error event, then the end
        await until(lambda: not watched.up, 10)
        ejected_after = time.monotonic() - killed_at
        settled = done
        await until(lambda: done >= settled + 16, 60)
        stop.set()
        await asyncio.gather(*workers)
        assert failures == [], failures[:3]
        print(f"SIGKILLed replica ejected after {ejected_after * 1000:.0f} ms")
        assert ejected_after <= 1.0
        # it comes back: readmitted by the probes, and given requests again
        victim.proc.wait(timeout=10)
        start(victim, llama_server, demo_model, tmp_path, processes.popen, shared=False)
        await until(lambda: watched.up, 30)
        before = watched.requests
        await asyncio.gather(*(ask(client) for _ in range(8)))
        assert watched.requests > before


async def test_a_silent_replica_is_ejected_and_readmitted(
    pair: list[Replica], processes: Processes
) -> None:
    """SIGSTOP: the kernel still accepts its connections, nothing answers (a link that
    went down looks the same to the router: probes time out)."""
    victim = pair[1]
    assert victim.proc is not None
    async with front([r.url for r in pair]) as fr:
        watched = fr.remote.replicas[1]
        assert watched.up
        os.killpg(victim.proc.pid, signal.SIGSTOP)
        try:
            stopped_at = time.monotonic()
            await until(lambda: not watched.up, 10)
            silent_for = time.monotonic() - stopped_at
            assert await ask(fr.client())  # the other replica answers meanwhile
        finally:
            os.killpg(victim.proc.pid, signal.SIGCONT)
        await until(lambda: watched.up, 30)
        print(f"silent replica ejected after {silent_for * 1000:.0f} ms")
        assert silent_for <= 3.0
        assert "probes missed" in watched.last_error


async def test_dns_discovery_follows_a_headless_services_records(pair: list[Replica]) -> None:
    """A DNS server this test runs answers for the name, as a headless Service would: one
    record per ready pod. Replicas join and leave with the records."""
    from tests.dns_server import start_dns

    server = await start_dns()
    name = "chat-pods.llm.svc.test"
    server.records[name] = [pair[0].host]
    discovery = Discovery(name=name, port=pair[0].port, interval=0.2,
                          nameserver=server.nameserver)  # fmt: skip
    try:
        async with front([], discovery=discovery) as fr:
            assert [r.url for r in fr.remote.replicas] == [pair[0].url]
            assert await ask(fr.client())
            server.records[name] = [pair[0].host, pair[1].host]
            await until(lambda: len(fr.remote.replicas) == 2, 10)
            client = fr.client()
            await asyncio.gather(*(ask(client, f"Question {i}.") for i in range(12)))
            assert all(r.requests > 0 for r in fr.remote.replicas)
            del server.records[name]  # every pod gone: NXDOMAIN
            await until(lambda: not fr.remote.replicas, 10)
            with pytest.raises(openai.APIStatusError) as caught:
                await ask(client)
            assert caught.value.status_code == 503
    finally:
        assert server.transport is not None
        server.transport.close()
