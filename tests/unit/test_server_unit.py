"""ManagedServer without processes: what happens before anything would be spawned."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from procman.errors import ModelError, ServerError
from procman.events import State
from procman.process.server import ManagedServer
from procman.spec import LogSettings, ServerSpec


def server(tmp_path: Path, model: Path) -> ManagedServer:
    spec = ServerSpec(
        name="demo",
        model=model,
        binary=tmp_path / "llama-server",
        log=LogSettings(directory=tmp_path),
    )
    return ManagedServer(spec)


async def test_an_invalid_model_fails_before_any_spawn(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all, just text")
    managed = server(tmp_path, bad)
    with pytest.raises(ModelError):  # the autouse guard would raise if a process were started
        await managed.start()
    assert managed.state is State.STOPPED
    assert managed.pid is None
    assert not await managed.wait_ready(0.01)  # nothing is starting: no wait at all
    with pytest.raises(ModelError):  # and it may be tried again
        await managed.start()


async def test_a_never_started_server_is_not_waited_for(tmp_path: Path) -> None:
    managed = server(tmp_path, tmp_path / "m.gguf")
    assert managed.url is None
    started = asyncio.get_running_loop().time()
    assert not await managed.wait_ready(5)
    assert asyncio.get_running_loop().time() - started < 1
    await managed.stop()  # idempotent on a server that never ran
    assert managed.state is State.STOPPED


async def test_start_while_starting_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import procman.models.gguf

    release = threading.Event()

    def slow_validate(path: object) -> None:
        release.wait(5)
        raise ModelError("checked too late")

    monkeypatch.setattr(procman.models.gguf, "validate_model", slow_validate)
    managed = server(tmp_path, tmp_path / "m.gguf")
    first = asyncio.create_task(managed.start())
    await asyncio.sleep(0.01)  # the first start is validating in its thread
    with pytest.raises(ServerError, match="already running"):
        await managed.start()
    release.set()
    with pytest.raises(ModelError):
        await first
    assert not await managed.wait_ready(0.01)
