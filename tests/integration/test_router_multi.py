"""Many models behind one endpoint, for real: llama-server processes, the openai client.

The demo model is served under several names (each its own llama-server),
started on demand. Checked: the four OpenAI endpoints (a stream relayed as
it is generated), LIFO order with one slot, a disconnect freeing the slot at
once, TTL unload and reload, ``max_loaded`` eviction, 429/404/401, and
``llamactl ps/stop/load`` against the running router. Every test is bounded
and stops what it started. The router's own overhead is timed by the bench
(``nox -s bench``, "Router overhead" in bench/REPORT.md), not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from procman.config import parse_config
from procman.events import Event, State
from procman.router import Router, RouterSettings
from procman.router.listen import bind_listener
from procman.router.scheduler import QueueSettings, Scheduler
from procman.spec import LogSettings
from procman.supervisor import AsyncSupervisor
from tests.integration.conftest import generating

KEY = "test-key"
PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Count to three."}]
CTL = [
    sys.executable,
    "-c",
    "import sys, procman.cli._ctl; from procman.cli._main import run; sys.exit(run(sys.argv[1:]))",
]


@dataclass
class Fleet:
    supervisor: AsyncSupervisor
    scheduler: Scheduler
    base: str
    events: list[Event]

    def client(self, key: str = KEY) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.base}/v1", api_key=key, max_retries=0, timeout=60
        )

    def stopped(self, name: str) -> list[Event]:
        return [
            e
            for e in self.events
            if e.server == name and e.state is State.STOPPED and not e.is_note
        ]


@contextlib.asynccontextmanager
async def fleet(
    toml: str, binary: Path, model: Path, logs: Path, *, max_loaded: int | None = None
) -> AsyncIterator[Fleet]:
    config = parse_config(tomllib.loads(toml.replace("DEMO", json.dumps(str(model)))))
    plan = config.plan(binary, log=LogSettings(directory=logs))
    supervisor = AsyncSupervisor(max_loaded=max_loaded)
    events: list[Event] = []
    supervisor.bus.subscribe(events.append)
    scheduler = Scheduler()
    for each in plan.models:
        supervisor.add(each.spec, ttl=each.ttl, on_demand=True)
        slots = QueueSettings(slots=each.spec.parallel or 1, maxsize=each.queue, order=each.order)
        scheduler.add(each.spec.name, slots)
    router = Router(supervisor, RouterSettings(api_key=KEY, ready_timeout=60), scheduler=scheduler)
    try:
        await router.start(bind_listener("127.0.0.1", 0))
        assert router.address is not None
        yield Fleet(supervisor, scheduler, f"http://127.0.0.1:{router.address[1]}", events)
    finally:
        await router.stop()
        await supervisor.stop()


async def until(check: object, timeout: float = 30) -> None:  # noqa: ASYNC109
    """Poll a condition in a test (the code under test waits on events, not polls)."""
    deadline = time.monotonic() + timeout
    while not callable(check) or not check():
        assert time.monotonic() < deadline, f"condition not reached in {timeout:g} s"
        await asyncio.sleep(0.02)


async def until_async(check: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:  # noqa: ASYNC109
    """``until`` for a condition that must be asked over the network."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"condition not reached in {timeout:g} s"
        await asyncio.sleep(0.05)


THREE = """
[models.chat]
path = DEMO
ctx = 1024
aliases = ["default"]
[models.code]
path = DEMO
ctx = 1024
args = ["--temp", "0.2"]
[models.embed]
path = DEMO
ctx = 512
args = ["--embeddings", "--pooling", "mean"]
"""


async def test_three_models_through_the_openai_client(
    llama_server: Path, demo_model: Path, tmp_path: Path
) -> None:
    async with fleet(THREE, llama_server, demo_model, tmp_path) as f:
        client = f.client()
        listed = {m.id: m for m in (await client.models.list()).data}
        assert set(listed) == {"chat", "code", "embed"}
        assert all(m.model_dump()["state"] == "stopped" for m in listed.values())

        started = time.monotonic()
        answer = await client.chat.completions.create(model="chat", messages=PROMPT, max_tokens=8)
        print(f"\non-demand load + first chat answer: {time.monotonic() - started:.2f} s")
        assert answer.choices[0].message.content and answer.model

        # streamed through the router as generated: the first piece arrives while the
        # server is still generating (a buffering relay passes it on only at the end)
        stream = await client.chat.completions.create(
            model="default", messages=PROMPT, max_tokens=3000, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        assert await generating(f.supervisor.servers["chat"].endpoint)
        await stream.close()

        completion = await client.completions.create(model="code", prompt="def add(", max_tokens=8)
        assert completion.choices[0].text

        vectors = await client.embeddings.create(model="embed", input=["hello", "world"])
        assert len(vectors.data) == 2 and len(vectors.data[0].embedding) > 10

        states = {m.id: m.model_dump()["state"] for m in (await client.models.list()).data}
        assert states == {"chat": "ready", "code": "ready", "embed": "ready"}

        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="gpt-5", messages=PROMPT, max_tokens=2)
        assert missing.value.code == "model_not_found"
        assert "chat" in str(missing.value) and "embed" in str(missing.value)

        with pytest.raises(openai.AuthenticationError):
            await f.client("wrong").models.list()
        async with aiohttp.ClientSession() as http, http.get(f"{f.base}/health") as health:
            assert health.status == 200  # /health needs no key


ONE_SLOT = """
[models.one]
path = DEMO
ctx = 4096
parallel = 1
queue = 3
order = "lifo"
"""


async def hold_the_slot(client: openai.AsyncOpenAI) -> openai.AsyncStream[object]:
    """A streamed request that would generate for a long time; returns once it is generating."""
    stream = await client.chat.completions.create(
        model="one", messages=PROMPT, max_tokens=3000, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    await stream.__aiter__().__anext__()
    return stream  # type: ignore[return-value]


async def test_lifo_order_429_and_a_disconnect_frees_the_slot(
    llama_server: Path, demo_model: Path, tmp_path: Path
) -> None:
    async with fleet(ONE_SLOT, llama_server, demo_model, tmp_path) as f:
        client = f.client()
        queue = f.scheduler.queue("one")
        assert queue is not None
        holder = await hold_the_slot(client)
        finished: list[int] = []
        finished_at: list[float] = []

        async def short(number: int) -> None:
            await client.chat.completions.create(model="one", messages=PROMPT, max_tokens=4)
            finished.append(number)
            finished_at.append(time.monotonic())

        tasks = []
        for number in range(3):
            tasks.append(asyncio.create_task(short(number)))
            await until(lambda n=number: queue.waiting == n + 1)

        with pytest.raises(openai.RateLimitError) as full:  # queue = 3: the fourth is refused
            await client.chat.completions.create(model="one", messages=PROMPT, max_tokens=2)
        assert full.value.response.headers.get("retry-after")

        released = time.monotonic()
        await holder.close()  # the client goes away mid-answer
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        print(f"\nslot free -> first queued answer: {finished_at[0] - released:.2f} s")
        assert finished == [2, 1, 0]  # newest first
        # the slot was freed by the disconnect, not by the end of 3000 tokens: llama-server
        # cancelled the holder's task (the refused fourth request never reached it)
        assert "cancel task" in (tmp_path / "one.log").read_text(errors="replace")


async def test_disconnect_before_the_answer_aborts_upstream(
    llama_server: Path, demo_model: Path, tmp_path: Path
) -> None:
    async with fleet(ONE_SLOT, llama_server, demo_model, tmp_path) as f:
        client = f.client()
        queue = f.scheduler.queue("one")
        assert queue is not None
        await client.chat.completions.create(model="one", messages=PROMPT, max_tokens=2)  # load
        long = asyncio.create_task(
            client.chat.completions.create(
                model="one", messages=PROMPT, max_tokens=3000, extra_body={"ignore_eos": True}
            )
        )
        await until(lambda: queue.active == 1)
        queued = asyncio.create_task(
            client.chat.completions.create(model="one", messages=PROMPT, max_tokens=2)
        )
        await until(lambda: queue.waiting == 1)
        queued.cancel()  # leaves the line before its turn
        await asyncio.gather(queued, return_exceptions=True)
        await until(lambda: queue.waiting == 0, 5)

        one = f.supervisor.servers["one"].endpoint
        await until_async(lambda: generating(one), 30)  # the long request is generating
        long.cancel()
        await asyncio.gather(long, return_exceptions=True)
        started = time.monotonic()
        log = tmp_path / "one.log"
        # llama-server notices a closed connection of a non-streamed request by polling (1 s)
        await until(lambda: "cancel task" in log.read_text(errors="replace"), 10)
        noticed = time.monotonic() - started
        await client.chat.completions.create(model="one", messages=PROMPT, max_tokens=4)
        waited = time.monotonic() - started
        print(f"\nnon-streamed disconnect: cancelled upstream after {noticed:.2f} s,", end=" ")
        print(f"next answer after {waited:.2f} s")
        assert queue.active == 0 and queue.waiting == 0


TTL = """
[models.brief]
path = DEMO
ctx = 512
ttl = "2s"
[models.other]
path = DEMO
ctx = 512
"""


async def test_ttl_unload_reload_and_max_loaded(
    llama_server: Path, demo_model: Path, tmp_path: Path
) -> None:
    async with fleet(TTL, llama_server, demo_model, tmp_path, max_loaded=1) as f:
        client = f.client()
        servers = f.supervisor.servers

        def state(name: str) -> State:
            return servers[name].state

        await client.completions.create(model="brief", prompt="Hi", max_tokens=2)
        assert state("brief") is State.READY
        await until(lambda: state("brief") is State.STOPPED, 15)
        assert "ttl" in f.stopped("brief")[-1].reason
        await client.completions.create(model="brief", prompt="Hi", max_tokens=2)  # reloads
        assert state("brief") is State.READY

        await client.completions.create(model="other", prompt="Hi", max_tokens=2)
        assert state("brief") is State.STOPPED  # made room: max_loaded = 1
        assert "max_loaded" in f.stopped("brief")[-1].reason
        assert state("other") is State.READY


async def test_ps_stop_load_against_the_running_router(
    llama_server: Path, demo_model: Path, tmp_path: Path
) -> None:
    async with fleet(TTL, llama_server, demo_model, tmp_path) as f:
        env = {**os.environ, "LLAMACTL_URL": f.base, "LLAMACTL_API_KEY": KEY, "COLUMNS": "300"}

        async def ctl(*args: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                *CTL, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(), 90)
            finally:
                if proc.returncode is None:  # timed out: the test fails, the CLI goes
                    proc.kill()
                    await proc.wait()
            return proc.returncode or 0, out.decode(), err.decode()

        code, _, err = await ctl("load", "other")
        assert code == 0, err
        code, out, err = await ctl("ps", "--json")
        assert code == 0, err
        rows = {row["name"]: row for row in json.loads(out)}
        other = rows["other"]
        assert other["state"] == "ready" and other["pid"]
        assert other["port"] is None and other["socket"].endswith(".sock")  # private: no port
        assert other["rss_bytes"] > 10 * 2**20 and other["restarts"] == 0
        assert other["model"] == str(demo_model) and rows["brief"]["state"] == "stopped"
        code, _, err = await ctl("stop", "other")
        assert code == 0, err
        assert f.supervisor.servers["other"].state is State.STOPPED
        code, _, err = await ctl("stop", "nosuch")
        assert code != 0 and "nosuch" in err
        env["LLAMACTL_API_KEY"] = "wrong"
        code, _, err = await ctl("ps")
        assert code != 0 and "LLAMACTL_API_KEY" in err
