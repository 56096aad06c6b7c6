"""The meter on this test's own process, a fake NVML, and llama-server's /metrics text."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import psutil
import pytest

from procman.memory.meter import (
    LlamaMetrics,
    Meter,
    parse_llama_metrics,
    timings_tokens_per_second,
)

GiB = 1 << 30

#: the start of llama-server b11312's /metrics answer (tools/server/server-task.cpp)
LLAMA_METRICS = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 120
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 64
# HELP llamacpp:tokens_predicted_seconds_total Predict process time
# TYPE llamacpp:tokens_predicted_seconds_total counter
llamacpp:tokens_predicted_seconds_total 0.5
# HELP llamacpp:n_decode_total Total number of llama_decode() calls
# TYPE llamacpp:n_decode_total counter
llamacpp:n_decode_total 66
# HELP llamacpp:prompt_tokens_seconds Average prompt throughput in tokens/s
# TYPE llamacpp:prompt_tokens_seconds gauge
llamacpp:prompt_tokens_seconds 2400.5
# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s
# TYPE llamacpp:predicted_tokens_seconds gauge
llamacpp:predicted_tokens_seconds 128
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
# HELP llamacpp:requests_deferred Number of requests deferred
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 0
"""


@dataclass
class FakeProcessInfo:
    pid: int
    usedGpuMemory: int | None


class FakeNvml:
    """Two GPUs; this process uses 1 GiB on one and 2 GiB on the other."""

    def __init__(self, processes: list[list[FakeProcessInfo]]) -> None:
        self.processes = processes
        self.shut = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.processes)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        return self.processes[handle]


class BrokenNvml(FakeNvml):
    def nvmlInit(self) -> None:
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")


def test_samples_own_process_rss_and_cpu() -> None:
    meter = Meter(use_nvml=False, pss_interval=0)
    pid = os.getpid()
    first = meter.sample([pid])[pid]
    assert first.alive and first.rss_bytes > 10 * 1024 * 1024
    assert first.cpu_percent is None  # nothing to compare with yet
    assert first.vram_bytes is None  # unknown, not zero
    sum(i * i for i in range(200_000))  # burn a little CPU
    second = meter.sample([pid])[pid]
    assert second.cpu_percent is not None and second.cpu_percent >= 0
    if second.pss_bytes is not None:
        assert 0 < second.pss_bytes <= second.rss_bytes * 1.05


def test_pss_is_read_at_most_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = psutil.Process.memory_full_info

    def counting(self: psutil.Process) -> Any:
        calls.append(self.pid)
        return real(self)

    monkeypatch.setattr(psutil.Process, "memory_full_info", counting)
    pid = os.getpid()
    meter = Meter(use_nvml=False, pss_interval=3600)
    samples = [meter.sample([pid])[pid] for _ in range(3)]
    if meter.pss_interval is None:  # no smaps_rollup on this kernel
        assert calls == [] and samples[0].pss_bytes is None
        return
    assert calls == [pid]  # once, then repeated
    assert samples[0].pss_bytes == samples[2].pss_bytes is not None
    assert Meter(use_nvml=False, pss_interval=None).sample([pid])[pid].pss_bytes is None


def test_dead_pid_is_reported_and_forgotten() -> None:
    meter = Meter(use_nvml=False)
    dead = 2**22 + 12345  # above the default pid_max
    sample = meter.sample([dead])[dead]
    assert not sample.alive
    assert meter.sample([]) == {}


def test_vram_per_pid_from_nvml_summed_over_gpus() -> None:
    pid = os.getpid()
    nvml = FakeNvml(
        [
            [FakeProcessInfo(pid, 1 * GiB), FakeProcessInfo(1, 5 * GiB)],
            [FakeProcessInfo(pid, 2 * GiB), FakeProcessInfo(2, None)],
        ]
    )
    meter = Meter(nvml=nvml)
    assert meter.has_vram
    assert meter.sample([pid])[pid].vram_bytes == 3 * GiB
    assert meter.vram_by_pid() == {pid: 3 * GiB, 1: 5 * GiB}
    meter.close()
    assert nvml.shut and meter.vram_by_pid() is None


def test_a_pid_nvml_does_not_list_uses_no_vram() -> None:
    meter = Meter(nvml=FakeNvml([[]]))
    assert meter.sample([os.getpid()])[os.getpid()].vram_bytes == 0


def test_without_nvml_vram_is_unknown() -> None:
    meter = Meter(nvml=BrokenNvml([]))
    assert not meter.has_vram
    assert meter.sample([os.getpid()])[os.getpid()].vram_bytes is None


def test_parse_llama_server_metrics() -> None:
    metrics = parse_llama_metrics(LLAMA_METRICS)
    assert metrics == LlamaMetrics(
        predicted_tokens_seconds=128,
        prompt_tokens_seconds=2400.5,
        tokens_predicted_total=64,
        tokens_predicted_seconds_total=0.5,
        prompt_tokens_total=120,
        requests_processing=1,
        requests_deferred=0,
    )
    later = LlamaMetrics(tokens_predicted_total=164)
    assert later.tokens_per_second_since(metrics, 2.0) == 50
    assert later.tokens_per_second_since(metrics, 0) == 0


def test_tokens_per_second_from_response_timings() -> None:
    response = {"timings": {"predicted_n": 8, "predicted_per_second": 95.5}}
    assert timings_tokens_per_second(response) == pytest.approx(95.5)
    assert timings_tokens_per_second({"choices": []}) is None
