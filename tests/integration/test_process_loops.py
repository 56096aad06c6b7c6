"""The supervisor's process handling on both event loops `serve` may run on.

uvloop's process transport is not an ``asyncio.SubprocessTransport``; a
type check once made the supervisor miss every exit under uvloop, so each
stop waited out its 10 s SIGKILL timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from procman.process._child import describe_exit, spawn, terminate
from procman.process.logs import LineTail, RotatingLog

pytestmark = pytest.mark.server

Runner = Callable[[Coroutine[Any, Any, Any]], Any]


# uvloop is a dependency wherever these tests run (not on Windows): never skipped
LOOPS = [pytest.param(asyncio.run, id="asyncio"), pytest.param(uvloop.run, id="uvloop")]


@pytest.mark.parametrize("run", LOOPS)
def test_a_stopped_child_is_seen_to_exit(run: Runner, tmp_path: Path) -> None:
    async def main() -> tuple[bool, str]:
        transport, child = await spawn(
            ["sh", "-c", "echo listening on nothing; exec sleep 100"],
            RotatingLog(tmp_path / "c.log"),
            LineTail(),
        )
        await asyncio.wait_for(child.listening, 30)  # the shell is up and has said so
        await terminate(transport, child, grace=5.0, name="sleeper")
        return child.exited.done(), describe_exit(child.exited.result())

    exited, how = run(main())
    assert exited
    assert "SIGTERM" in how


@pytest.mark.parametrize("run", LOOPS)
def test_a_child_that_dies_by_itself_is_seen_to_exit(run: Runner, tmp_path: Path) -> None:
    async def main() -> str:
        _, child = await spawn(["sh", "-c", "exit 3"], RotatingLog(tmp_path / "c.log"), LineTail())
        return describe_exit(await asyncio.wait_for(child.exited, 30))

    assert "3" in run(main())
