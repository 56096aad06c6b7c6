"""The blocking facade: one long-lived loop thread, the core's logic, clean shutdown."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

import procman
from procman.events import Event, State


async def _thread_name() -> str:
    return threading.current_thread().name


def test_coroutines_run_on_the_facades_own_long_lived_thread() -> None:
    with procman.Supervisor() as sup:
        first = sup.run(_thread_name())
        second = sup.run(_thread_name())
        assert first == second == "procman-supervisor"
        assert threading.current_thread().name != first
        assert sup.status() == []
        assert isinstance(sup.core, procman.AsyncSupervisor)


def test_callbacks_are_called_from_the_loop_thread() -> None:
    seen: list[tuple[str, Event]] = []
    with procman.Supervisor() as sup:
        sup.on_event(lambda event: seen.append((threading.current_thread().name, event)))

        async def emit() -> None:
            sup.bus.emit("demo", State.STARTING, State.STOPPED, "spawned")

        sup.run(emit())
    assert [(name, event.state) for name, event in seen] == [("procman-supervisor", State.STARTING)]


def test_close_is_idempotent_and_ends_the_thread() -> None:
    sup = procman.Supervisor()
    thread = sup._thread
    sup.close()
    sup.close()
    assert not thread.is_alive()
    with pytest.raises(procman.ServerError, match="closed"):
        sup.status()


def test_a_missing_model_raises_before_anything_is_spawned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMACTL_HOME", str(tmp_path))
    with procman.Supervisor() as sup, pytest.raises(procman.ModelError, match="not found"):
        sup.serve("no-such-model")
    assert sup._closed


def test_a_timeout_cancels_the_call() -> None:
    import concurrent.futures

    with procman.Supervisor() as sup, pytest.raises(concurrent.futures.TimeoutError):
        sup.run(asyncio.sleep(5), timeout=0.05)


def test_log_lines_reach_a_callback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import queue

    monkeypatch.setenv("LLAMACTL_HOME", str(tmp_path))
    log = tmp_path / "logs" / "demo.log"
    log.parent.mkdir()
    log.write_text("")
    lines: queue.Queue[str] = queue.Queue()
    with procman.Supervisor() as sup:
        stop = sup.on_log("demo", lines.put)
        got = ""
        for _ in range(100):  # following starts at the end: append until it is seen
            with log.open("a") as handle:
                handle.write("load_model: loading\n")
            try:
                got = lines.get(timeout=0.1)
                break
            except queue.Empty:
                continue
        stop()
    assert "load_model" in got
