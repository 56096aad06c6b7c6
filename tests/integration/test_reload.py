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

    def wait_line(self, found: Callable[[str], bool], since: int = 0, timeout: float = 120) -> str:
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


class Scenario:
    """One ``serve --config`` and the reloads the test makes it do, through ``trigger``."""

    def __init__(self, trigger: str, file: Path, env: dict[str, str], serve: Serve) -> None:
        self.trigger, self.file, self.env, self.serve = trigger, file, env, serve
        self.text = file.read_text()
        self.api: Api
        self.first: dict[str, int | None] = {}

    async def start(self, http: aiohttp.ClientSession) -> None:
        serving = await self.serve.line(lambda line: "serving" in line)
        base = re.search(r"http://127\.0\.0\.1:\d+", serving)
        assert base is not None, serving
        self.api = Api(http, base.group(0))
        for name in ("a", "b", "d"):
            await self.api.load(name)
        self.first = await self.api.pids()
        assert all(self.first[name] for name in ("a", "b", "d"))

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.api.base}/v1", api_key=KEY, max_retries=0, timeout=300
        )

    async def reload(self, new_text: str) -> str:
        """Apply ``new_text`` through the trigger under test; the reload's report."""
        mark = len(self.serve.lines)
        write_atomically(self.file, new_text)
        if self.trigger == "command":
            done = await asyncio.to_thread(
                subprocess.run,
                [*CLI, "reload", "--url", self.api.base],
                env={**self.env, "LLAMACTL_API_KEY": KEY},
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
        if self.trigger == "sighup":
            self.serve.proc.send_signal(signal.SIGHUP)
        return await self.serve.line(lambda line: summary_line(line) or "refused" in line, mark)

    async def ttl_in_place(self) -> None:
        self.text = self.text.replace('ttl = "10m"', 'ttl = "5m"')
        report = await self.reload(self.text)
        assert "1 changed in place" in report and "2 unchanged" in report, report
        assert await self.api.pids() == self.first
        assert (await self.api.status())["b"]["ttl"] == 300

    async def restart_add_remove(self) -> None:
        """b's ctx (b restarts), c added, d removed while one of its requests is generated."""
        client = self.client()
        stream = await client.chat.completions.create(
            model="d", messages=PROMPT, max_tokens=900, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        # d is generating for it now: 900 tokens (~15 s here) outlive the reload's start, which
        # begins the removal within a second or two of the file changing
        pieces = [await stream.__aiter__().__anext__()]
        self.text = self.text.replace("ctx = 512\nttl", "ctx = 1024\nttl")
        self.text = self.text.replace("[models.d]", "[models.c]")
        mark = len(self.serve.lines)
        reloading = asyncio.create_task(self.reload(self.text))
        pieces += [chunk async for chunk in stream]  # finishes though d is being removed
        finish = [c.choices[0].finish_reason for c in pieces if c.choices]
        assert finish[-1] == "length", finish
        report = await reloading
        for what in ("1 restarted", "1 added", "1 removed", "1 unchanged"):
            assert what in report, report
        after, first = await self.api.pids(), self.first
        assert after["a"] == first["a"]  # untouched
        assert after["b"] is not None and after["b"] != first["b"]  # restarted
        assert "d" not in after and after["c"] is None  # removed; added, starts on demand
        printed = "\n".join(self.serve.lines[mark:]) + report
        assert f"pid {first['b']} -> {after['b']}" in printed
        assert "1 request(s) in flight finished" in printed
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="d", messages=PROMPT, max_tokens=2)
        answer = await client.chat.completions.create(model="c", messages=PROMPT, max_tokens=4)
        assert answer.choices[0].message.content is not None

    async def broken_file(self) -> None:
        """A wrong file changes nothing, and says where it is wrong."""
        status = await self.api.status()
        broken = self.text.replace("ctx = 1024\nparallel", 'ctx = "big"\nparallel')
        line = broken.splitlines().index('ctx = "big"') + 1
        report = await self.reload(broken)
        assert "refused" in report and f"{self.file}:{line}: models.a.ctx" in report, report
        assert stable(await self.api.status()) == stable(status)

    async def logs_over_http(self) -> None:
        argv = [*CLI, "logs", "a", "--url", self.api.base, "--lines", "5"]
        with_key = {**self.env, "LLAMACTL_API_KEY": KEY}
        done = await asyncio.to_thread(
            subprocess.run, argv, env=with_key, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        printed = done.stdout.splitlines()
        written = (Path(self.env["LLAMACTL_HOME"]) / "logs" / "a.log").read_text().splitlines()
        assert len(printed) == 5 and set(printed) <= set(written), printed
        refused = await asyncio.to_thread(
            subprocess.run, argv, env=self.env, capture_output=True, text=True, timeout=60
        )
        assert refused.returncode == 1 and "LLAMACTL_API_KEY" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr

    async def check_log(self, http: aiohttp.ClientSession, json_log: bool) -> None:
        """What serve wrote: the lines /admin/logs serves; as JSON, every line a record."""
        auth = self.api.auth
        async with http.get(f"{self.api.base}/admin/logs?lines=10000", headers=auth) as resp:
            assert resp.status == 200
            journal = (await resp.text()).splitlines()
        async with http.get(f"{self.api.base}/admin/logs") as resp:
            assert resp.status == 401  # the key is needed
        assert any(summary_line(line) for line in journal)
        if self.trigger == "command":  # `llamactl logs --url` reads a model's log the same way
            await self.logs_over_http()
        self.serve.proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(self.serve.proc.wait, 60) == 0
        assert set(journal) <= set(self.serve.lines)
        if not json_log:
            return
        records = [json.loads(line) for line in self.serve.lines]  # every line parses
        assert all(set(r) >= FIELDS for r in records)
        kinds = {r["event"] for r in records}
        assert {"spawn", "loading", "ready", "admitted", "reload", "stopping", "stopped"} <= kinds
        assert {r["event"] for r in records if r["model"] is not None} <= set(EVENT_KINDS)
        reloads = [(r["model"], r["reason"]) for r in records if r["event"] == "reload"]
        assert ("d", "reload: removed: 1 request(s) in flight finished, stopped pid "
                f"{self.first['d']}") in reloads  # fmt: skip


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
    file.write_text(CONFIG.format(key=KEY, model=json.dumps(str(demo_model))))
    env = {**os.environ, "LLAMACTL_HOME": str(tmp_path / "home"), "COLUMNS": "300"}
    env["LLAMACTL_LOG_FORMAT"] = "json" if json_log else "text"
    argv = [*CLI, "serve", "--config", str(file), "--server", str(llama_server)]
    serve = Serve(processes, [*argv, *(["--watch"] if trigger == "watch" else [])], env)
    scenario = Scenario(trigger, file, env, serve)
    await scenario.start(http)
    clients = Clients(scenario.client(), "a", 4)
    try:
        await clients.each_finish_one_more()
        for step in (scenario.ttl_in_place, scenario.restart_add_remove, scenario.broken_file):
            await step()
            await clients.each_finish_one_more()  # a's clients went on throughout
    finally:
        await clients.stop()
        print("\n".join(serve.lines[-60:]))  # shown if the test fails
    assert clients.failures == [], clients.failures
    assert min(clients.done) >= 4, clients.done
    await scenario.check_log(http, json_log)


#: status fields that change by themselves (memory, load, samples)
VOLATILE = {"rss_bytes", "idle_seconds", "cpu_percent", "vram_bytes", "tokens_per_second", "queue",
            "in_use", "pss_bytes"}  # fmt: skip


def stable(status: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: {k: v for k, v in row.items() if k not in VOLATILE} for n, row in status.items()}
