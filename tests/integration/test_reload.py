"""Reloading a running ``llamactl serve --config`` for real, under load, three ways.

One scenario, run through ``llamactl reload`` (the admin API), ``SIGHUP`` and
``--watch``: four clients stream from model ``a`` the whole time while the
file changes ``b``'s ttl (nothing restarts), then ``b``'s ctx (only ``b``
restarts), adds ``c`` and removes ``d`` while a request to ``d`` is being
generated (it completes). Then a broken file changes nothing. Checked: no
request to ``a`` fails, which process ids survive, what the reload printed,
that every line ``--log-format json`` wrote parses with its fields, and
``GET /admin/logs``. Real llama-server processes, real HTTP; bounded
throughout, and everything started is stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from procman.events import EVENT_KINDS
from tests.integration.conftest import Processes

KEY = "reload-test-key"
CLI = [sys.executable, "-m", "procman.cli"]
PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Count to ten."}]
FIELDS = {"time", "level", "event", "model", "state", "previous", "reason", "pid", "port"}

CONFIG = """
[server]
host = "127.0.0.1"
port = 0
api_key = "{key}"

[models.a]
path = {model}
ctx = 1024
parallel = 4

[models.b]
path = {model}
ctx = 512
ttl = "10m"

[models.d]
path = {model}
ctx = 1024
"""


class Serve:
    """A ``llamactl serve --config`` process and the lines it writes on stderr."""

    def __init__(self, processes: Processes, argv: list[str], env: dict[str, str]) -> None:
        self.proc = processes.popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_line(self, found: Callable[[str], bool], since: int = 0, timeout: float = 120) -> str:  # noqa: ASYNC109
        """The first line after ``since`` that ``found`` accepts (waits for it to be written)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[since:]:
                    if found(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    tail = "\n".join(self.lines[-30:])
                    raise AssertionError(f"no such line in {timeout:g} s; the last ones:\n{tail}")
                self._changed.wait(remaining)

    async def line(self, found: Callable[[str], bool], since: int = 0) -> str:
        return await asyncio.to_thread(self.wait_line, found, since)


def write_atomically(path: Path, text: str) -> None:
    """As editors save: a new file renamed over the old one."""
    fresh = path.with_suffix(".tmp")
    fresh.write_text(text)
    fresh.replace(path)


class Api:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http, self.base = http, base
        self.auth = {"Authorization": f"Bearer {KEY}"}

    async def status(self) -> dict[str, dict[str, Any]]:
        async with self.http.get(f"{self.base}/admin/status", headers=self.auth) as resp:
            assert resp.status == 200, await resp.text()
            return {row["name"]: row for row in (await resp.json())["models"]}

    async def pids(self) -> dict[str, int | None]:
        return {name: row["pid"] for name, row in (await self.status()).items()}

    async def load(self, name: str) -> None:
        async with self.http.post(f"{self.base}/admin/load/{name}", headers=self.auth) as resp:
            assert resp.status == 200, await resp.text()


class Clients:
    """``n`` clients streaming short answers from ``model`` until stopped."""

    def __init__(self, client: openai.AsyncOpenAI, model: str, n: int) -> None:
        self.client, self.model = client, model
        self.done = [0] * n
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run(i)) for i in range(n)]

    async def _run(self, index: int) -> None:
        while not self._stop.is_set():
            try:
                stream = await self.client.chat.completions.create(
                    model=self.model, messages=PROMPT, max_tokens=12, stream=True
                )
                pieces = [chunk async for chunk in stream]
                assert pieces, "an empty stream"
                self.done[index] += 1
            except Exception as exc:  # every failure is counted, none may happen
                self.failures.append(f"client {index}: {exc!r}")

    async def each_finish_one_more(self) -> None:
        """Wait until every client has completed another request (they run, not just wait)."""
        start = list(self.done)
        deadline = time.monotonic() + 120
        while any(now <= then for now, then in zip(self.done, start, strict=True)):
            assert time.monotonic() < deadline, f"clients stalled: {self.done} {self.failures}"
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 120)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        yield session


def summary_line(line: str) -> bool:
    return "reloaded " in line


@pytest.mark.parametrize("trigger", ["command", "sighup", "watch"])
async def test_reload_under_load(
    trigger: str,
    llama_server: Path,
    demo_model: Path,
    tmp_path: Path,
    processes: Processes,
    http: aiohttp.ClientSession,
) -> None:
    json_log = trigger != "sighup"  # SIGHUP's run checks the text a person reads
    file = tmp_path / "models.toml"
    text = CONFIG.format(key=KEY, model=json.dumps(str(demo_model)))
    file.write_text(text)
    env = {**os.environ, "LLAMACTL_HOME": str(tmp_path / "home"), "COLUMNS": "300"}
    env["LLAMACTL_LOG_FORMAT"] = "json" if json_log else "text"
    argv = [*CLI, "serve", "--config", str(file), "--server", str(llama_server)]
    serve = Serve(processes, [*argv, *(["--watch"] if trigger == "watch" else [])], env)
    serving = await serve.line(lambda line: "serving" in line)
    base = re.search(r"http://127\.0\.0\.1:\d+", serving)
    assert base is not None, serving
    api = Api(http, base.group(0))

    async def reload(new_text: str) -> str:
        """Apply ``new_text`` through the trigger under test; the reload's report."""
        mark = len(serve.lines)
        write_atomically(file, new_text)
        if trigger == "command":
            done = await asyncio.to_thread(
                subprocess.run,
                [*CLI, "reload", "--url", api.base],
                env={**env, "LLAMACTL_API_KEY": KEY},
                capture_output=True,
                text=True,
                timeout=300,
            )
            printed = done.stdout + done.stderr
            if "refused" not in printed:
                assert done.returncode == 0, printed
                assert printed.startswith("reloaded "), printed
            else:
                assert done.returncode == 1, printed  # a refusal is an error for the command
            return printed
        if trigger == "sighup":
            serve.proc.send_signal(signal.SIGHUP)
        return await serve.line(lambda line: summary_line(line) or "refused" in line, mark)

    for name in ("a", "b", "d"):
        await api.load(name)
    first = await api.pids()
    assert all(first[name] for name in ("a", "b", "d"))
    clients = Clients(
        openai.AsyncOpenAI(base_url=f"{api.base}/v1", api_key=KEY, max_retries=0, timeout=120),
        "a",
        4,
    )
    try:
        await clients.each_finish_one_more()

        # 1. b's ttl: applied in place, nothing restarts
        text = text.replace('ttl = "10m"', 'ttl = "5m"')
        report = await reload(text)
        assert "1 changed in place" in report and "2 unchanged" in report, report
        assert await api.pids() == first
        assert (await api.status())["b"]["ttl"] == 300
        await clients.each_finish_one_more()

        # 2. b's ctx (b restarts), c added, d removed while one of its requests is generated
        d_client = openai.AsyncOpenAI(
            base_url=f"{api.base}/v1", api_key=KEY, max_retries=0, timeout=300
        )
        d_stream = await d_client.chat.completions.create(
            model="d", messages=PROMPT, max_tokens=60, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        d_pieces = [await d_stream.__aiter__().__anext__()]  # d is generating for it now
        text = text.replace("ctx = 512\nttl", "ctx = 1024\nttl").replace("[models.d]", "[models.c]")
        mark = len(serve.lines)
        reloading = asyncio.create_task(reload(text))
        d_pieces += [chunk async for chunk in d_stream]  # finishes though d is being removed
        finish = [c.choices[0].finish_reason for c in d_pieces if c.choices]
        assert finish[-1] == "length", finish
        report = await reloading
        for what in ("1 restarted", "1 added", "1 removed", "1 unchanged"):
            assert what in report, report
        after = await api.pids()
        assert after["a"] == first["a"]  # untouched
        assert after["b"] is not None and after["b"] != first["b"]  # restarted
        assert "d" not in after and after["c"] is None  # removed; added, starts on demand
        assert f"pid {first['b']} -> {after['b']}" in "\n".join(serve.lines[mark:]) + report
        assert "1 request(s) in flight finished" in "\n".join(serve.lines[mark:]) + report
        with pytest.raises(openai.NotFoundError):
            await d_client.chat.completions.create(model="d", messages=PROMPT, max_tokens=2)
        answer = await d_client.chat.completions.create(model="c", messages=PROMPT, max_tokens=4)
        assert answer.choices[0].message.content is not None
        await clients.each_finish_one_more()

        # 3. a broken file changes nothing, and says where it is wrong
        status = await api.status()
        broken = text.replace("ctx = 1024\nparallel", 'ctx = "big"\nparallel')
        line = broken.splitlines().index('ctx = "big"') + 1
        report = await reload(broken)
        assert "refused" in report and f"{file}:{line}: models.a.ctx" in report, report
        assert stable(await api.status()) == stable(status)
        await clients.each_finish_one_more()
    finally:
        await clients.stop()
        print("\n".join(serve.lines[-60:]))  # shown if the test fails
    assert clients.failures == [], clients.failures
    assert min(clients.done) >= 4, clients.done

    # what serve wrote: the same lines /admin/logs serves; as JSON, every line a record
    async with http.get(f"{api.base}/admin/logs?lines=10000", headers=api.auth) as resp:
        assert resp.status == 200
        journal = (await resp.text()).splitlines()
    async with http.get(f"{api.base}/admin/logs") as resp:
        assert resp.status == 401  # the key is needed
    assert any(summary_line(line) for line in journal)
    serve.proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(serve.proc.wait, 60) == 0
    assert set(journal) <= set(serve.lines)
    if json_log:
        records = [json.loads(line) for line in serve.lines]  # every line parses
        assert all(FIELDS <= set(r) for r in records)
        kinds = {r["event"] for r in records}
        assert {"spawn", "loading", "ready", "admitted", "reload", "stopping", "stopped"} <= kinds
        assert {r["event"] for r in records if r["model"] is not None} <= set(EVENT_KINDS)
        reloads = [(r["model"], r["reason"]) for r in records if r["event"] == "reload"]
        assert ("d", "reload: removed: 1 request(s) in flight finished, stopped pid "
                f"{first['d']}") in reloads  # fmt: skip


#: status fields that change by themselves (memory, load, samples)
VOLATILE = {"rss_bytes", "idle_seconds", "cpu_percent", "vram_bytes", "tokens_per_second", "queue",
            "in_use"}  # fmt: skip


def stable(status: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: {k: v for k, v in row.items() if k not in VOLATILE} for n, row in status.items()}
