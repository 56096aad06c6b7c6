"""Compute threads: the cores shared among servers that may run at once, unless chosen."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
import pytest

from procman.config import load_config
from procman.errors import ConfigError
from procman.events import Event
from procman.process.cpu import share_cores, usable_cores
from procman.process.endpoint import Endpoint
from procman.spec import ServerSpec
from procman.supervisor import AsyncSupervisor
from tests.unit.test_limits_unit import MACHINE
from tests.unit.test_limits_unit import spec as model_spec

SOCKET = Endpoint(socket="/run/demo-1234.sock")


def spec(**fields: object) -> ServerSpec:
    base: dict[str, object] = {"name": "m", "model": Path("/m.gguf"), "binary": Path("/srv")}
    return ServerSpec(**(base | fields))  # type: ignore[arg-type]


def test_a_server_alone_keeps_llama_servers_default() -> None:
    share = share_cores(spec(), servers=1, cores=8)
    assert share.spec == spec() and share.reason == ""
    assert "--threads" not in share.spec.argv(SOCKET)


@pytest.mark.parametrize(("servers", "cores", "threads"), [(2, 2, 1), (3, 2, 1), (4, 16, 4)])
def test_servers_that_may_run_at_once_share_the_cores(
    servers: int, cores: int, threads: int
) -> None:
    share = share_cores(spec(), servers=servers, cores=cores)
    assert share.spec.threads == threads
    argv = share.spec.argv(SOCKET)
    assert argv[argv.index("--threads") + 1] == str(threads)
    assert share.reason == (
        f"threads: {threads} of {cores} core(s), as up to {servers} models may run at once "
        "(set threads to change)"
    )


def test_a_chosen_thread_count_wins() -> None:
    configured = share_cores(spec(threads=3), servers=4, cores=2)
    assert configured.spec.threads == 3 and configured.reason == "threads: 3 (as configured)"
    in_args = share_cores(spec(extra_args=("-t", "6")), servers=4, cores=2)
    assert in_args.spec.threads is None and in_args.reason == "threads: 6 (as configured)"
    argv = in_args.spec.argv(SOCKET)
    assert "--threads" not in argv and argv[-2:] == ["-t", "6"]
    # both: the extra args come last on the command line, so llama-server takes them
    both = spec(threads=3, extra_args=("--threads=5",))
    assert both.threads_given == 5 and "--threads" not in both.argv(SOCKET)


def test_threads_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="threads must be at least 1, got 0"):
        spec(threads=0)
    config = tmp_path / "models.toml"
    config.write_text('[models.a]\npath = "demo"\nthreads = 0\n')
    with pytest.raises(ConfigError, match=r"models\.a\.threads: must be at least 1, got 0"):
        load_config(config)
    config.write_text('[models.a]\npath = "demo"\nthreads = 2\n')
    assert load_config(config).models["a"].threads == 2


def test_usable_cores_are_physical_and_within_the_affinity_mask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 16 if logical else 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert usable_cores() == 8  # hyper-threads are not cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert usable_cores() == 3  # taskset, a container's cpuset
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: None)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert usable_cores() == 16


class _Admitted(Exception):
    """Raised instead of spawning: the admission has been decided."""


async def _admit_only(before_spawn: Callable[[], Awaitable[None]] | None = None) -> None:
    assert before_spawn is not None
    await before_spawn()
    raise _Admitted


@pytest.mark.parametrize(("max_loaded", "threads"), [(None, 1), (1, None)])
async def test_the_supervisor_shares_the_cores_among_the_models_that_may_run_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_loaded: int | None, threads: int | None
) -> None:
    monkeypatch.setattr("procman.supervisor.usable_cores", lambda: 2)
    events: list[Event] = []
    async with AsyncSupervisor(machine=MACHINE, max_loaded=max_loaded) as supervisor:
        supervisor.bus.subscribe(events.append)
        for name in ("a", "b", "c"):
            server = supervisor.add(model_spec(tmp_path, name), on_demand=True)
        monkeypatch.setattr(server, "start", _admit_only)
        with pytest.raises(_Admitted):
            await supervisor.load("c")
        assert server.spec.threads == threads
        admitted = [e.reason for e in events if e.event == "admitted"]
        assert len(admitted) == 1
        if threads is None:  # one model at a time: it has the machine to itself
            assert "threads" not in admitted[0]
        else:
            assert "threads: 1 of 2 core(s), as up to 3 models may run at once" in admitted[0]
