"""Which event loop `serve` and the daemon run on."""

from __future__ import annotations

import asyncio
import sys

import pytest

from procman._loop import run


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop is not a dependency on Windows")
def test_uvloop_runs_the_long_lived_commands() -> None:
    assert run(loop_module()).startswith("uvloop")


def test_the_stdlib_loop_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMACTL_EVENT_LOOP", "asyncio")
    assert run(loop_module()).startswith("asyncio")
