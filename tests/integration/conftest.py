"""Integration tests use the real compiled llama-server and the real demo model.

The ``llama_server`` fixture is the default verified build for this machine,
exactly what ``llamactl build`` makes: compiled into the cache on first use
(~7 minutes cold on 2 cores), a cache hit in seconds afterwards. Tests that
use it are marked ``compile`` and ``server`` automatically.

Processes: a test starts its long-lived processes with the ``processes``
fixture, which puts each in its own process group and stops every group (and
the groups its descendants made, such as ninja's) on teardown, whatever the
test did. ``tests/conftest.py`` then checks that nothing the test started is
left running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

from buildtools import BuildResult
from procman.process.endpoint import Endpoint

#: the marker of tests that must run before anything uses the cached build
FIRST = "before_the_build"  # pytest.mark.before_the_build


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{FIRST}: runs before any test that uses the cached build (on a cold cache it "
        "makes that build itself)",
    )


@pytest.fixture(scope="session")
def default_build() -> BuildResult:
    import buildtools

    return buildtools.build_default()


@pytest.fixture(scope="session")
def llama_server(default_build: BuildResult) -> Path:
    return default_build.build.binary


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from buildtools.demo import demo_model_path

    return demo_model_path()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "llama_server" in fixtures or "default_build" in fixtures:
            item.add_marker(pytest.mark.compile)
            item.add_marker(pytest.mark.server)
    items.sort(key=lambda item: item.get_closest_marker(FIRST) is None)  # stable


def stop_group(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """Stop ``proc``'s process group and those of its descendants: SIGTERM, then SIGKILL.

    The descendants are listed first, while ``proc`` still links them: a
    child in a session of its own (ninja under ``llamactl build``) is not in
    ``proc``'s group, and once ``proc`` is gone it is nobody's child.
    """
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    ours = os.getpgrp()
    groups = {proc.pid}
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            groups.add(os.getpgid(member.pid))
    groups.discard(ours)  # never pytest's own group
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
        _, alive = psutil.wait_procs(family, timeout=grace)
        if not alive:
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


class Processes:
    """Starts processes for one test, each in a new session; all are stopped on teardown."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[Any]] = []

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.Popen[Any]:
        proc: subprocess.Popen[Any] = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:  # ours and unreaped: its pid cannot have been reused
                stop_group(proc)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()


@pytest.fixture
def processes() -> Iterator[Processes]:
    started = Processes()
    try:
        yield started
    finally:
        started.stop_all()


async def generating(endpoint: Endpoint | None) -> bool:
    """Whether the llama-server at ``endpoint`` is generating right now (its ``/slots``).

    A relay that buffers a streamed answer passes on its first piece only after
    the server finished; a relay that streams passes it on while the server is
    still generating. With ``ignore_eos`` and a large ``max_tokens`` the
    difference is seconds or more, so reading this after the first piece tells
    the two apart without timing anything.
    """
    import aiohttp

    assert endpoint is not None, "the server is not running"
    async with (
        aiohttp.ClientSession(connector=endpoint.connector()) as http,
        http.get(
            f"{endpoint.url}/slots",
            headers=dict(endpoint.auth()),
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        slots = await resp.json()
    return any(slot["is_processing"] and slot["next_token"][0]["n_remain"] != 0 for slot in slots)
