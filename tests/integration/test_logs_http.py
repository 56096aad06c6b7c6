"""Logs and events over HTTP for real: a llama-server's log (tail, and followed across a
rotation), llamactl's own log, the event stream, each behind the router's access rules."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest

from procman.process.logs import read_tail
from procman.router import Router, RouterSettings
from procman.router._logs import Journal
from procman.router.listen import bind_listener
from procman.spec import LogSettings, ServerSpec
from procman.supervisor import AsyncSupervisor

KEY = "logs-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Sse:
    """The ``data:`` messages of one server-sent event stream, collected as they arrive."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.messages: list[str] = []
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._read(response))

    async def _read(self, response: aiohttp.ClientResponse) -> None:
        data: list[str] = []
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                data.append(line[6:])
            elif not line and data:
                self.messages.append("\n".join(data))
                data = []
                self._arrived.set()

    async def until(self, found: object, timeout: float = 60) -> str:  # noqa: ASYNC109
        """The first message ``found`` accepts, waiting for it to arrive."""
        assert callable(found)
        async with asyncio.timeout(timeout):
            while True:
                for message in self.messages:
                    if found(message):
                        return message
                self._arrived.clear()
                await self._arrived.wait()

    def close(self) -> None:
        self._task.cancel()


@contextlib.asynccontextmanager
async def sse(http: aiohttp.ClientSession, url: str) -> AsyncIterator[Sse]:
    async with http.get(url, headers=AUTH) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        stream = Sse(response)
        try:
            yield stream
        finally:
            stream.close()


def inode(path: Path) -> int:
    return path.stat().st_ino


def rotated(path: Path) -> Path:
    return path.with_name(f"{path.name}.1")


async def refused_without_the_rules(http: aiohttp.ClientSession, base: str) -> None:
    """The rules of the admin API: the key, Host (DNS rebinding), Origin."""
    for route in ("/admin/logs/chat", "/admin/logs", "/admin/events"):
        async with http.get(f"{base}{route}") as resp:
            assert resp.status == 401, route
        foreign = {"Origin": "http://evil.example"}
        async with http.get(f"{base}{route}", headers=foreign) as resp:
            assert resp.status == 403, route
        rebound = {**AUTH, "Host": "evil.example"}
        async with http.get(f"{base}{route}", headers=rebound) as resp:
            assert resp.status == 403, route


async def follow_across_a_rotation(
    http: aiohttp.ClientSession, base: str, path: Path, client: openai.AsyncOpenAI
) -> None:
    """Followed across a rotation: lines written to the new file arrive too."""
    async with sse(http, f"{base}/admin/logs/chat?follow=1&lines=1") as followed:
        await followed.until(lambda m: True)  # following from here on
        first = inode(path)
        requests = 0
        while inode(path) == first:  # until the log has been rotated
            await client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "Hi"}],
                max_tokens=4,
            )  # fmt: skip
            requests += 1
            assert requests < 200, "the log never rotated"
        await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        # a line wholly in the file the rotation began (its first may continue the old
        # file's last: rotation cuts between reads, not lines; its last may be partial)
        written = read_tail(path, 3)
        assert len(written) == 3
        await followed.until(lambda m: m == written[1])
        assert rotated(path).exists()


async def test_logs_and_events_over_http(
    llama_server: Path, demo_model: Path, tmp_path: Path
) -> None:
    # small files, so that a few requests rotate the log while it is followed
    logs = LogSettings(directory=tmp_path, max_bytes=12 * 1024, backups=2)
    spec = ServerSpec(name="chat", model=demo_model, binary=llama_server, ctx=512, log=logs)
    async with AsyncSupervisor() as supervisor:
        router = Router(supervisor, RouterSettings(api_key=KEY, ready_timeout=60))
        router.journal = Journal()
        router.journal.write("llamactl: hello from the router")
        supervisor.add(spec, on_demand=True)
        await router.start(bind_listener("127.0.0.1", 0))
        assert router.address is not None
        base = f"http://127.0.0.1:{router.address[1]}"
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        try:
            async with aiohttp.ClientSession() as http:
                await refused_without_the_rules(http, base)

                async with sse(http, f"{base}/admin/events?history=100") as events:
                    await supervisor.load("chat")
                    ready = json.loads(await events.until(lambda m: '"ready"' in m))
                    assert ready["model"] == "chat" and ready["event"] == "ready"
                    assert ready["pid"] == supervisor.servers["chat"].pid

                # the tail
                path = tmp_path / "chat.log"
                async with http.get(f"{base}/admin/logs/chat?lines=5", headers=AUTH) as resp:
                    assert resp.status == 200
                    tail = (await resp.text()).splitlines()
                assert len(tail) == 5 and tail == read_tail(path, 5)
                for bad in ("lines=-1", "lines=many", "lines=100001"):
                    async with http.get(f"{base}/admin/logs/chat?{bad}", headers=AUTH) as resp:
                        assert resp.status == 400, bad
                async with http.get(f"{base}/admin/logs/nope", headers=AUTH) as resp:
                    assert resp.status == 404

                await follow_across_a_rotation(http, base, path, client)

                # llamactl's own log
                async with http.get(f"{base}/admin/logs", headers=AUTH) as resp:
                    assert (await resp.text()) == "llamactl: hello from the router\n"
                async with sse(http, f"{base}/admin/logs?follow=1") as own:
                    await own.until(lambda m: m == "llamactl: hello from the router")
                    router.journal.write("a line written while followed")
                    await own.until(lambda m: m == "a line written while followed")
        finally:
            await router.stop()


@pytest.mark.parametrize("query", ["", "?follow=1"])
async def test_a_router_without_a_journal_or_a_config_says_so(query: str) -> None:
    async with AsyncSupervisor() as supervisor:
        router = Router(supervisor)
        await router.start(bind_listener("127.0.0.1", 0))
        assert router.address is not None
        base = f"http://127.0.0.1:{router.address[1]}"
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{base}/admin/logs{query}") as resp:
                    assert resp.status == 404
                    assert "keeps no log" in (await resp.json())["error"]["message"]
                async with http.post(f"{base}/admin/reload") as resp:
                    assert resp.status == 404
                    assert "serves no config file" in (await resp.json())["error"]["message"]
        finally:
            await router.stop()
