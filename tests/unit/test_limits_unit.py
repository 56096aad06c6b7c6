"""The supervisor's memory wiring without processes: admission, -ngl choice, sampling, snapshot."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import pytest

from procman.events import Event, State
from procman.memory._limits import Limits, is_cuda_build
from procman.memory.budget import MachineMemory, OverBudget
from procman.memory.enforce import LimitAction, LimitSettings
from procman.memory.meter import Sample
from procman.router.metrics import MetricsExporter
from procman.spec import ServerSpec
from procman.supervisor import AsyncSupervisor
from tests.unit.test_model_file import write_model

MiB = 1024 * 1024
MACHINE = MachineMemory(total_bytes=16 << 30, available_bytes=8 << 30)


def spec(tmp_path: Path, name: str = "m", **fields: object) -> ServerSpec:
    model = tmp_path / "m.gguf"
    if not model.exists():
        write_model(model)
    return ServerSpec(name=name, model=model, binary=tmp_path / "bin" / "llama-server", **fields)  # type: ignore[arg-type]


def limits(**settings: object) -> Limits:
    return Limits(
        memory_budget=64 * MiB,
        vram_budget=None,
        activity=lambda name: (0.0, False),
        settings=LimitSettings(**settings),  # type: ignore[arg-type]
        machine=MACHINE,
        use_nvml=False,
    )


async def test_a_server_over_the_budget_is_refused_before_anything_is_spawned(
    tmp_path: Path,
) -> None:
    events: list[Event] = []
    async with AsyncSupervisor(memory_budget=1 * MiB, machine=MACHINE) as supervisor:
        supervisor.bus.subscribe(events.append)
        server = supervisor.add(spec(tmp_path), on_demand=True)
        with pytest.raises(OverBudget, match=r"needs \d+ MiB of memory, 1 MiB is free") as info:
            await supervisor.load("m")
        assert info.value.resource == "memory" and info.value.budget == 1 * MiB
        assert server.pid is None
        assert [(e.event, e.state) for e in events] == [("refused", State.STOPPED)]  # no spawn
        assert "1 MiB is free" in events[0].reason
        assert supervisor.metrics_snapshot().refusals_total == 1


async def test_a_memory_limit_below_the_estimate_is_refused(tmp_path: Path) -> None:
    async with AsyncSupervisor(machine=MACHINE) as supervisor:
        supervisor.add(spec(tmp_path), memory_limit=1024)
        with pytest.raises(OverBudget, match="above its memory_limit"):
            await supervisor.load("m")


def test_auto_layers_on_a_cpu_build_are_none_and_say_why(tmp_path: Path) -> None:
    prepared = limits().prepare(spec(tmp_path, gpu_layers="auto"), None)
    assert prepared.spec.gpu_layers == 0
    assert prepared.layers_reason.startswith("gpu_layers: auto: no GPU memory reported")
    assert prepared.need.device_bytes == 0 and prepared.need.host_bytes > 0


def test_the_prompt_cache_is_reserved(tmp_path: Path) -> None:
    plain = limits().prepare(spec(tmp_path), None).need.host_bytes
    cached = limits().prepare(spec(tmp_path, cache_ram=100), None).need.host_bytes
    assert cached - plain == 100 * MiB


def test_cuda_builds_are_told_by_their_module_or_manifest(tmp_path: Path) -> None:
    binary = tmp_path / "b" / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    assert not is_cuda_build(binary)
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({"plan": {"backend": "cuda"}}))
    assert is_cuda_build(binary)
    (binary.parent / "libggml-cuda.so").touch()
    assert is_cuda_build(binary)


def test_sampling_measures_and_decides_once_the_excess_is_sustained(tmp_path: Path) -> None:
    lim = limits(samples=2, seconds=0, action=LimitAction.STOP)
    lim.prepare(spec(tmp_path), None)
    lim.set_limit("m", 1024)  # far below this test process's own RSS
    pid = os.getpid()
    assert lim.sample({"m": pid}) == {}  # one sample over is not enough
    decision = lim.sample({"m": pid})["m"]
    assert decision.action is LimitAction.STOP
    assert decision.reason.startswith("rss ") and decision.limit_bytes == 1024
    assert lim.samples["m"].rss_bytes > 1024
    assert lim.sample({}) == {} and lim.samples == {}


async def test_snapshot_and_status_carry_the_samples(tmp_path: Path) -> None:
    async with AsyncSupervisor(machine=MACHINE) as supervisor:
        supervisor.add(spec(tmp_path))
        snap = supervisor.metrics_snapshot({"m": 2})
        assert [s.name for s in snap.servers] == ["m"] and snap.servers[0].rss_bytes is None
        assert snap.servers[0].state is State.STOPPED and snap.queue_depth == {"m": 2}
        text = MetricsExporter(supervisor).render().decode()
        assert 'llamactl_server_state{server="m",state="stopped"} 1.0' in text
        row = supervisor.status()[0]
        assert row["cpu_percent"] is None and row["tokens_per_second"] is None


async def test_sampling_reads_processes_off_the_event_loop_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PSS makes the kernel walk the page tables (~10 ms): never on the loop's thread
    threads: list[threading.Thread] = []
    async with AsyncSupervisor(machine=MACHINE) as supervisor:
        meter = supervisor.limits.meter
        real = meter.sample

        def recording(pids: Iterable[int]) -> dict[int, Sample]:
            threads.append(threading.current_thread())
            return real(pids)

        monkeypatch.setattr(meter, "sample", recording)
        await supervisor.sample_now()
    assert threads and threads[0] is not threading.main_thread()
