"""The crash policy with real processes (procman.process.policy): what counts, and that a model
failed by its crashes is not locked out for good.

Stand-in servers (``fake_server`` from test_serve) crash or are signalled on cue;
the router in front of them is the real one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from procman import RestartSettings, Router, RouterSettings, bind_listener
from procman.events import Event, State
from procman.process.server import ManagedServer
from procman.spec import LogSettings, ServerSpec
from procman.supervisor import AsyncSupervisor
from tests.integration.test_serve import fake_server


def stand_in(tmp_path: Path, mode: str, model: Path, **restart: float) -> ServerSpec:
    """A stand-in server; ``model`` is only estimated (admission), never loaded."""
    settings = {"backoff_initial": 0.05, "backoff_max": 0.2, **restart}
    return ServerSpec(
        name="m",
        model=model,
        binary=fake_server(tmp_path, mode),
        log=LogSettings(directory=tmp_path),
        stop_grace=2.0,
        restart=RestartSettings(**settings),  # type: ignore[arg-type]
    )


async def until(condition: object, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not callable(condition) or not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def routed(tmp_path: Path) -> AsyncIterator[tuple[AsyncSupervisor, str, list[Event]]]:
    async with AsyncSupervisor() as supervisor:
        events: list[Event] = []
        supervisor.bus.subscribe(events.append)
        router = Router(supervisor, RouterSettings(ready_timeout=20))
        await router.start(bind_listener("127.0.0.1", 0))
        assert router.address is not None
        try:
            yield supervisor, f"http://127.0.0.1:{router.address[1]}", events
        finally:
            await router.stop()


async def post(base: str) -> tuple[int, dict[str, str], str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}/v1/chat/completions",
            json={"model": "m"},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.text()


async def test_a_model_failed_by_its_crashes_starts_again_after_the_cooldown(
    routed: tuple[AsyncSupervisor, str, list[Event]], tmp_path: Path, demo_model: Path
) -> None:
    supervisor, base, events = routed
    spec = stand_in(tmp_path, "crash", demo_model, max_restarts=1, cooldown=2.0)
    server = supervisor.add(spec, validate=False, on_demand=True)
    await supervisor.load("m")  # ready, then crashes 0.3 s after each start
    await until(lambda: server.state is State.FAILED, "failed after two crashes")
    failed = next(e for e in events if e.state is State.FAILED)
    assert "2 crashes within" in failed.reason and "starts it again" in failed.reason
    assert 0 < server.retry_in() <= 2.0

    status, headers, body = await post(base)  # in the cooldown: refused, with when to retry
    assert status == 503 and "model_failed" in body
    assert 1 <= int(headers["Retry-After"]) <= 2
    starts = sum(e.state is State.STARTING for e in events)

    await until(lambda: server.retry_in() == 0, "the cooldown to pass", 10)
    status, _, _ = await post(base)  # the stand-in answers POSTs 501: what matters is that
    assert status != 503  # the request got through to a started server again
    assert sum(e.state is State.STARTING for e in events) == starts + 1


@pytest.mark.parametrize(
    ("sig", "counted"),
    [(signal.SIGTERM, False), (signal.SIGHUP, False), (signal.SIGKILL, True)],
)
async def test_a_signal_from_outside_is_a_crash_only_if_it_is_sigkill(
    tmp_path: Path, demo_model: Path, sig: signal.Signals, counted: bool
) -> None:
    server = ManagedServer(stand_in(tmp_path, "ok", demo_model), validate=False)
    events: list[Event] = []
    server.bus.subscribe(events.append)
    await server.start()
    try:
        for round_ in range(3):  # more than max_restarts would allow, were they crashes
            pid = server.pid
            assert pid is not None
            os.kill(pid, sig)
            await until(
                lambda pid=pid: server.state is State.READY and server.pid not in {None, pid},
                f"the restart after {sig.name} #{round_ + 1}",
            )
            if counted:
                break
        restarting = [e for e in events if e.state is State.RESTARTING]
        assert restarting
        if counted:
            assert "restart 1/5" in restarting[0].reason
            assert server.policy.recent_crashes == 1
        else:
            assert all("not a crash" in e.reason for e in restarting)
            assert server.policy.recent_crashes == 0
            assert server.state is State.READY
    finally:
        await server.stop()
