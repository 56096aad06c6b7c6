"""Memory budget, memory limits and ``/metrics``, wired into the running router, for real.

Two names serve the demo model (each its own llama-server, ``-c 512 -np 1``,
estimated at ~154 MiB). With a 250 MiB memory budget one fits and two do
not: the second evicts the first while it is idle, and is refused with the
numbers while the first is serving. A memory limit below the server's real
RSS (~137 MiB) restarts it through the restart policy until it fails, or
stops it. ``GET /metrics`` parses as Prometheus text with the expected
series. Every test is bounded and stops what it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from procman._units import format_bytes
from procman.config import parse_config
from procman.events import Event, State
from procman.memory.enforce import LimitAction, LimitSettings
from procman.router import Router, RouterSettings
from procman.router.listen import bind_listener
from procman.router.scheduler import QueueSettings, Scheduler
from procman.spec import LogSettings, RestartSettings
from procman.supervisor import AsyncSupervisor

KEY = "test-key"
MiB = 1024 * 1024
TOML = """
[models.a]
path = DEMO
ctx = 512
[models.b]
path = DEMO
ctx = 512
[models.tight]
path = DEMO
ctx = 512
memory_limit = "32MiB"
"""
BODY = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@dataclass
class Fleet:
    supervisor: AsyncSupervisor
    base: str
    events: list[Event]
    http: aiohttp.ClientSession

    async def chat(self, model: str) -> tuple[int, dict[str, object]]:
        async with self.http.post(
            f"{self.base}/v1/chat/completions", json={**BODY, "model": model}
        ) as resp:
            return resp.status, await resp.json()

    def of(self, name: str, state: State) -> list[Event]:
        return [e for e in self.events if e.server == name and e.state is state and not e.is_note]

    async def until(self, name: str, state: State, timeout: float = 60) -> Event:  # noqa: ASYNC109
        async with asyncio.timeout(timeout), self.supervisor.bus.listen() as later:
            if found := self.of(name, state):
                return found[-1]
            async for event in later:
                if event.server == name and event.state is state and not event.is_note:
                    return event
        raise AssertionError("the event stream ended")


def admission_need(supervisor: AsyncSupervisor, name: str) -> int:
    """The host memory admission counts for ``name`` here: its estimate on this machine."""
    spec = dataclasses.replace(supervisor.servers[name].spec, name=f"{name}-estimate")
    return supervisor.limits.prepare(spec, None).need.host_bytes


@contextlib.asynccontextmanager
async def fleet(
    binary: Path, model: Path, logs: Path, **supervisor_args: object
) -> AsyncIterator[Fleet]:
    config = parse_config(tomllib.loads(TOML.replace("DEMO", json.dumps(str(model)))))
    plan = config.plan(binary, log=LogSettings(directory=logs))
    supervisor = AsyncSupervisor(**supervisor_args)  # type: ignore[arg-type]
    events: list[Event] = []
    supervisor.bus.subscribe(events.append)
    scheduler = Scheduler()
    for each in plan.models:
        # one crash more than one restart marks the server failed
        spec = dataclasses.replace(each.spec, restart=RestartSettings(max_restarts=1))
        supervisor.add(spec, on_demand=True, memory_limit=each.memory_limit)
        scheduler.add(each.spec.name, QueueSettings(slots=1, maxsize=8))
    router = Router(supervisor, RouterSettings(api_key=KEY, ready_timeout=60), scheduler=scheduler)
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        await router.start(bind_listener("127.0.0.1", 0))
        assert router.address is not None
        async with asyncio.timeout(90), aiohttp.ClientSession(headers=headers) as http:
            yield Fleet(supervisor, f"http://127.0.0.1:{router.address[1]}", events, http)
    finally:
        await router.stop()
        await supervisor.stop()
    assert all(s.pid is None for s in supervisor.servers.values())


async def test_budget_evicts_the_idle_server_then_refuses_with_the_numbers(
    llama_server: Path, demo_model: Path, tmp_path: Path
) -> None:
    async with fleet(llama_server, demo_model, tmp_path, memory_budget=250 * MiB) as f:
        assert (await f.chat("a"))[0] == 200
        status, _ = await f.chat("b")  # a is idle: stopped to make room
        assert status == 200
        evicted = f.of("a", State.STOPPED)[-1]
        assert evicted.reason.startswith("evicted for 'b'")
        assert f.supervisor.servers["a"].pid is None

        async with f.supervisor.using("b"):  # b busy: nothing can be evicted for a
            status, body = await f.chat("a")
        assert status == 503
        error = body["error"]
        assert isinstance(error, dict) and error["code"] == "over_budget"
        message = str(error["message"])
        need = admission_need(f.supervisor, "a")  # ~154 MiB on a CPU build
        assert f"needs {format_bytes(need)} of memory" in message, message
        assert "of a 250 MiB budget" in message
        assert "held by busy servers" in message
        assert f.supervisor.servers["b"].state is State.READY  # untouched

        status, body = await f.chat("tight")  # its own limit is below its estimate
        assert status == 503 and "above its memory_limit of 32 MiB" in json.dumps(body)
        stats = f.supervisor.limits.ledger.stats
        assert (stats.admissions, stats.evictions, stats.refusals) == (2, 1, 2)


@pytest.mark.parametrize("action", [LimitAction.RESTART, LimitAction.STOP])
async def test_a_server_over_its_memory_limit_is_restarted_or_stopped(
    llama_server: Path, demo_model: Path, tmp_path: Path, action: LimitAction
) -> None:
    limit = LimitSettings(samples=2, seconds=0.3, action=action)
    async with fleet(
        llama_server, demo_model, tmp_path, sample_interval=0.2, limit_settings=limit
    ) as f:
        assert (await f.chat("a"))[0] == 200
        # the estimate (~154 MiB) passed admission; the real RSS (~137 MiB) is over this
        f.supervisor.set_memory_limit("a", 64 * MiB)
        if action is LimitAction.STOP:
            stopped = await f.until("a", State.STOPPED)
            assert stopped.reason.startswith("rss ") and "> limit 64 MiB" in stopped.reason
            return
        restarted = await f.until("a", State.RESTARTING)
        assert "> limit 64 MiB" in restarted.reason and "restart 1/1" in restarted.reason
        failed = await f.until("a", State.FAILED)  # breached again after the restart
        assert "> limit 64 MiB" in failed.reason and "crashes within" in failed.reason
        assert f.supervisor.servers["a"].restarts == 1


async def test_metrics_endpoint_exports_the_expected_series(
    llama_server: Path, demo_model: Path, tmp_path: Path
) -> None:
    async with fleet(llama_server, demo_model, tmp_path) as f:
        assert (await f.chat("a"))[0] == 200
        await f.supervisor.sample_now()  # CPU% is a difference: two samples
        await asyncio.sleep(0.2)
        await f.supervisor.sample_now()
        async with aiohttp.ClientSession() as anonymous, anonymous.get(f"{f.base}/metrics") as resp:
            assert resp.status == 401  # behind the key, like /v1
        async with f.http.get(f"{f.base}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    names = {name for name, _ in samples}
    for series in (
        "llamactl_server_rss_bytes",
        "llamactl_server_cpu_percent",
        "llamactl_queue_depth",
        "llamactl_admissions_total",
        "llamactl_evictions_total",
        "llamactl_refusals_total",
        "llamactl_restarts_total",
        "llamactl_server_requests_total",
        "llamactl_server_state",
    ):
        assert series in names, series
    assert samples[("llamactl_server_rss_bytes", (("server", "a"),))] > 50 * MiB
    assert ("llamactl_server_rss_bytes", (("server", "b"),)) not in samples  # not running
    assert samples[("llamactl_admissions_total", ())] == 1
    assert samples[("llamactl_server_requests_total", (("server", "a"),))] == 1
    assert samples[("llamactl_queue_depth", (("model", "a"),))] == 0
    assert samples[("llamactl_server_state", (("server", "a"), ("state", "ready")))] == 1
