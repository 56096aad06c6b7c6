"""What a desktop app needs from the library: cancellable preparation with progress,
callbacks handed to the GUI thread, and a close() that ends calls in flight."""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import procman
from buildtools.builder import BuildProgress, _run_logged
from buildtools.cache import BuildCache
from buildtools.cancel import CancelToken
from buildtools.errors import BuildCancelled, CacheError
from buildtools.locate import ResolvedServer
from procman.daemon import _prepare

# -- CancelToken ----------------------------------------------------------------------------


def test_a_cancel_runs_each_stop_action_once_and_late_ones_at_once() -> None:
    token = CancelToken()
    ran: list[str] = []
    token.on_cancel(lambda: ran.append("a"))
    remove = token.on_cancel(lambda: ran.append("removed"))
    remove()
    token.raise_if_cancelled()  # not cancelled: nothing happens
    token.cancel()
    token.cancel()
    assert ran == ["a"]
    token.on_cancel(lambda: ran.append("late"))
    assert ran == ["a", "late"]
    assert token.cancelled
    with pytest.raises(BuildCancelled):
        token.raise_if_cancelled()


def test_waiting_for_a_held_build_lock_is_reported_and_cancellable(tmp_path: Path) -> None:
    cache = BuildCache(tmp_path)
    cache.builds.mkdir(parents=True)
    token = CancelToken()
    waiting = threading.Event()
    outcome: list[BaseException | None] = []

    def second_builder() -> None:
        try:
            with cache.lock("k", cancel=token, on_wait=waiting.set):
                outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    # flock conflicts between two open files, even in one process: this is "another builder"
    with (cache.builds / ".k.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        thread = threading.Thread(target=second_builder)
        thread.start()
        assert waiting.wait(10), "the wait for the lock was not reported"
        token.cancel()
        thread.join(10)
    assert len(outcome) == 1
    assert isinstance(outcome[0], BuildCancelled)


class _Child:
    """A build step that prints until its process group is signalled."""

    pid = 4242

    def __init__(self) -> None:
        self.returncode: int | None = None
        self.stdout = self._lines()

    def _lines(self) -> Iterator[str]:
        for n in range(1, 101):
            if self.returncode is not None:
                return
            yield f"[{n}/100] Building CXX object {n}.o\n"
        self.returncode = 0  # never signalled: the step "finishes" and the test fails

    def wait(self, timeout: float | None = None) -> int:
        assert self.returncode is not None
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode


def test_cancelling_a_build_step_kills_its_group_and_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    child = _Child()
    signalled: list[tuple[int, int]] = []

    def killpg(pid: int, sig: int) -> None:
        signalled.append((pid, sig))
        child.returncode = -sig

    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: child)
    monkeypatch.setattr(os, "killpg", killpg)
    token = CancelToken()

    def on_progress(progress: BuildProgress) -> None:
        if progress.done == 3:
            token.cancel()  # what the window's close does, from another thread

    with pytest.raises(BuildCancelled):
        _run_logged(
            ["ninja"],
            tmp_path / "log",
            stage="compile",
            env={},
            on_progress=on_progress,
            cancel=token,
        )
    assert signalled == [(child.pid, signal.SIGTERM)]


# -- Progress and prepare() -----------------------------------------------------------------


def test_progress_counts_the_compile_and_says_when_it_cannot() -> None:
    step = _prepare.build_progress(BuildProgress("compile", 50, 200, "[50/200] x.o"))
    assert (step.stage, step.step, step.fraction) == ("build", "compile", 0.25)
    assert _prepare.build_progress(BuildProgress("configure")).fraction is None


def _fake_world(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, resolve: Callable[..., ResolvedServer]
) -> None:
    import buildtools
    from procman.models import refs

    monkeypatch.setattr(refs, "resolve_model", lambda ref: tmp_path / f"{ref}.gguf")
    monkeypatch.setattr(buildtools, "resolve_server", resolve)


def test_prepare_reports_each_step_and_returns_what_it_found(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    binary = tmp_path / "llama-server"

    def resolve(explicit: Any, **kw: Any) -> ResolvedServer:
        assert kw["build_if_missing"] is True
        for done in (1, 2):
            kw["on_progress"](BuildProgress("compile", done, 2, f"[{done}/2]"))
        return ResolvedServer(binary=binary, origin="built", reason="built now")

    _fake_world(monkeypatch, tmp_path, resolve)
    seen: list[procman.Progress] = []
    done = threading.Event()
    preparation = procman.prepare("demo", on_progress=seen.append)
    preparation.add_done_callback(lambda _: done.set())
    result = preparation.result(10)
    assert done.wait(10)
    assert result == procman.Prepared(
        model=tmp_path / "demo.gguf", binary=binary, origin="built", built=True
    )
    assert [(p.stage, p.step, p.fraction) for p in seen] == [
        ("model", "resolve", None),
        ("model", "done", None),
        ("build", "compile", 0.5),
        ("build", "compile", 1.0),
        ("ready", "", None),
    ]


def test_cancel_ends_a_preparation_that_is_building(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    started = threading.Event()

    def resolve(explicit: Any, **kw: Any) -> ResolvedServer:
        token: CancelToken = kw["cancel"]
        started.set()
        token.wait(60)  # "compiling" until cancelled
        token.raise_if_cancelled()
        raise AssertionError("not cancelled")

    _fake_world(monkeypatch, tmp_path, resolve)
    preparation = procman.prepare("demo")
    assert started.wait(10)
    assert not preparation.done()
    preparation.cancel()
    with pytest.raises(procman.BuildCancelled):
        preparation.result(10)
    assert preparation.cancelled


def test_a_failed_preparation_raises_its_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def resolve(explicit: Any, **kw: Any) -> ResolvedServer:
        raise CacheError("no llama-server is available", hint="run `llamactl build`")

    _fake_world(monkeypatch, tmp_path, resolve)
    with pytest.raises(CacheError, match="no llama-server"):
        procman.prepare("demo", build=False).result(10)


# -- Inbox ----------------------------------------------------------------------------------


def _readable(inbox: procman.Inbox, timeout: float) -> bool:
    return bool(select.select([inbox], [], [], timeout)[0])


def test_calls_posted_from_another_thread_run_in_order_on_the_draining_thread() -> None:
    with procman.Inbox() as inbox:
        ran: list[tuple[int, str]] = []
        record = inbox.wrap(lambda n: ran.append((n, threading.current_thread().name)))
        assert not _readable(inbox, 0)
        poster = threading.Thread(target=lambda: [record(n) for n in range(3)], name="poster")
        poster.start()
        poster.join()
        assert _readable(inbox, 10)
        assert inbox.run_pending() == 3
        here = threading.current_thread().name
        assert ran == [(0, here), (1, here), (2, here)]
        assert not _readable(inbox, 0), "drained: the descriptor is quiet again"
        assert inbox.run_pending() == 0


def test_a_failing_call_keeps_the_rest_queued() -> None:
    with procman.Inbox() as inbox:
        ran: list[str] = []

        def boom() -> None:
            raise RuntimeError("boom")

        inbox.post(ran.append, "a")
        inbox.post(boom)
        inbox.post(ran.append, "c")
        with pytest.raises(RuntimeError):
            inbox.run_pending()
        assert ran == ["a"]
        assert _readable(inbox, 1)
        assert inbox.run_pending() == 1
        assert ran == ["a", "c"]


def test_posting_after_close_is_ignored() -> None:
    inbox = procman.Inbox()
    inbox.close()
    inbox.post(print, "never")  # a supervisor's late event, while the window is gone
    assert inbox.run_pending() == 0
    inbox.close()


# -- close() with calls in flight -------------------------------------------------------------


def test_close_ends_a_call_waiting_in_another_thread() -> None:
    sup = procman.Supervisor()
    running = threading.Event()
    outcome: list[BaseException | None] = []

    async def forever() -> None:
        running.set()
        await asyncio.Event().wait()

    def worker() -> None:
        try:
            sup.run(forever())
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    assert running.wait(10)
    sup.close()
    thread.join(10)
    assert not thread.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], procman.ServerError)
