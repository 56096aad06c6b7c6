"""The child protocol: the "listening on" readiness hint, and how its output is read."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from procman.process import _child as _process
from procman.process._child import Child
from procman.process.logs import LineTail, RotatingLog


def make_child(tmp_path: Path) -> Child:
    return Child(RotatingLog(tmp_path / "s.log"), LineTail())


async def test_the_listening_line_wakes_the_loading_pause_at_once(tmp_path: Path) -> None:
    child = make_child(tmp_path)
    child.pipe_data_received(1, b"I srv load_model: loading model 'm.gguf'\n")
    assert not child.listening.done()
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, child.pipe_data_received, 1, b"I srv llama_server: listen")
    loop.call_later(0.05, child.pipe_data_received, 1, b"ing on http://127.0.0.1:1\n")
    t0 = time.monotonic()
    exited = await child.pause_loading(30.0)
    assert not exited
    assert time.monotonic() - t0 < 5  # woken by the line (split over two reads), not the 30 s
    assert child.listening.done()
    assert (tmp_path / "s.log").read_bytes().endswith(b"listening on http://127.0.0.1:1\n")


async def test_after_the_line_the_pause_is_the_plain_interval(tmp_path: Path) -> None:
    child = make_child(tmp_path)
    child.pipe_data_received(1, b"listening on http://127.0.0.1:1\n")
    t0 = time.monotonic()
    assert not await child.pause_loading(0.2)
    assert time.monotonic() - t0 >= 0.19  # a 503 after the line must not turn into a busy loop


class DuckTransport:  # what uvloop hands over: the interface, not the asyncio class
    def get_returncode(self) -> int:
        return -9


async def test_any_process_transport_reports_the_exit(tmp_path: Path) -> None:
    child = make_child(tmp_path)
    child.connection_made(DuckTransport())  # type: ignore[arg-type]
    child.process_exited()
    assert child.exited.result() == -9


class DuckPipe:  # uvloop's pipe transport: pause/resume, not an asyncio.ReadTransport
    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pause_reading(self) -> None:
        self.paused, self.pauses = True, self.pauses + 1

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return False


class PipedTransport(DuckTransport):
    def __init__(self) -> None:
        self.pipe = DuckPipe()

    def get_pipe_transport(self, fd: int) -> DuckPipe | None:
        return self.pipe if fd == 1 else None


async def test_once_listening_the_output_is_read_in_bursts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_process, "LOG_REST", 0.05)
    child = make_child(tmp_path)
    transport = PipedTransport()
    child.connection_made(transport)  # type: ignore[arg-type]
    child.pipe_data_received(1, b"loading\n")
    assert not transport.pipe.paused  # while loading, every read at once
    child.pipe_data_received(1, b"listening on http://127.0.0.1:1\n")
    assert transport.pipe.paused  # then it rests after each read
    await asyncio.sleep(0.1)
    assert not transport.pipe.paused and transport.pipe.pauses == 1
    child.pipe_data_received(1, b"slot release\n")
    assert transport.pipe.paused
    child.process_exited()  # a crash's last words are read at once
    assert not transport.pipe.paused
    assert (tmp_path / "s.log").read_bytes().endswith(b"slot release\n")
