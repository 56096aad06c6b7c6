"""What each llama-server actually uses: memory, CPU, VRAM, and its generation speed.

A :class:`Meter` keeps one ``psutil.Process`` per pid because
``cpu_percent`` is a difference between two calls on the same object; a
fresh object would always report 0. Sampling is meant to run every few
seconds for every server, so it reads only what is cheap:

* RSS from ``/proc/PID/statm`` (``memory_info``): ~40 us of our CPU per
  server per sample, measured on three demo-model llama-servers.
* PSS, which splits the mmapped model pages two servers share, from
  ``smaps_rollup`` (``memory_full_info``, Linux >= 4.14). The kernel walks
  the page tables to answer, which cost ~3.6 ms per server per sample on the
  same servers, 100 times RSS; so PSS is refreshed at most every
  ``pss_interval`` seconds and the last value is repeated in between.
  Without ``smaps_rollup`` psutil would parse the whole ``smaps``: skipped.
* VRAM per process from NVML's ``nvmlDeviceGetComputeRunningProcesses``.
  NVML reports host pids: inside a container with its own pid namespace the
  pids do not match and VRAM reads as unknown (None), never as 0.
* Tokens per second from llama-server's ``/metrics`` (only served with
  ``--metrics``), see :func:`parse_llama_metrics`; or from a response's
  ``timings`` (:func:`timings_tokens_per_second`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from procman.process.endpoint import Endpoint

__all__ = [
    "LlamaMetrics",
    "Meter",
    "Sample",
    "parse_llama_metrics",
    "rss_bytes",
    "scrape_llama_metrics",
    "timings_tokens_per_second",
]

_HAS_SMAPS_ROLLUP = Path(f"/proc/{os.getpid()}/smaps_rollup").exists()


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One reading of one process; None where the figure is unknown here."""

    pid: int
    #: monotonic seconds
    time: float
    alive: bool = True
    rss_bytes: int = 0
    #: refreshed every ``Meter.pss_interval`` seconds, so possibly that old
    pss_bytes: int | None = None
    #: share of one CPU since the previous sample (may exceed 100); None on the first
    cpu_percent: float | None = None
    vram_bytes: int | None = None
    #: device memory per GPU UUID (NVML's index as text when it has no UUID); None: unknown
    vram_by_device: Mapping[str, int] | None = None


class Meter:
    """Samples a set of pids; keep one per supervisor and call :meth:`sample` periodically.

    :meth:`sample` may run in a worker thread (the supervisor's does: PSS is
    slow); it and :meth:`close` never overlap.
    """

    def __init__(
        self, *, nvml: Any = None, use_nvml: bool = True, pss_interval: float | None = 30.0
    ) -> None:
        """``pss_interval`` None never reads PSS; 0 reads it at every sample."""
        self._procs: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
        self.pss_interval = pss_interval if _HAS_SMAPS_ROLLUP else None
        self._pss: dict[int, tuple[float, int]] = {}
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._uuids: list[str] = []
        if use_nvml:
            self._open_nvml(nvml)

    def _open_nvml(self, nvml: Any) -> None:
        from buildtools._nvidia import nvidia_driver_loaded  # speed

        if nvml is None and not nvidia_driver_loaded():
            return  # skips importing pynvml and a failing nvmlInit (~10 ms at every start)
        try:
            if nvml is None:
                import pynvml  # speed

                nvml = pynvml
            nvml.nvmlInit()
            self._handles = [
                nvml.nvmlDeviceGetHandleByIndex(i) for i in range(int(nvml.nvmlDeviceGetCount()))
            ]
            self._uuids = [_uuid(nvml, h, i) for i, h in enumerate(self._handles)]
            self._nvml = nvml
        except Exception:  # no driver, no GPU, no library: VRAM stays unknown
            self._nvml, self._handles = None, []

    @property
    def has_vram(self) -> bool:
        return bool(self._handles)

    def vram_by_pid(self) -> dict[int, int] | None:
        """Device memory per host pid, summed over GPUs; None without NVML."""
        per_device = self.vram_by_pid_and_device()
        if per_device is None:
            return None
        return {pid: sum(cards.values()) for pid, cards in per_device.items()}

    def vram_by_pid_and_device(self) -> dict[int, dict[str, int]] | None:
        """Device memory per host pid and GPU UUID; None without NVML."""
        if self._nvml is None:
            return None
        used: dict[int, dict[str, int]] = {}
        try:
            for handle, uuid in zip(self._handles, self._uuids, strict=True):
                for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.usedGpuMemory is not None:  # None: not reported (Windows WDDM)
                        cards = used.setdefault(int(proc.pid), {})
                        cards[uuid] = cards.get(uuid, 0) + int(proc.usedGpuMemory)
        except Exception:  # a GPU fell off the bus, or the driver restarted
            return None
        return used

    def sample(self, pids: Iterable[int]) -> dict[int, Sample]:
        """Read every pid now; pids not asked for any more are forgotten."""
        with self._lock:
            return self._sample(set(pids))

    def _sample(self, wanted: set[int]) -> dict[int, Sample]:
        for gone in self._procs.keys() - wanted:
            del self._procs[gone]
            self._pss.pop(gone, None)
        vram = self.vram_by_pid_and_device() if wanted else None
        now = time.monotonic()
        return {pid: self._one(pid, now, vram) for pid in wanted}

    def _one(self, pid: int, now: float, vram: Mapping[int, dict[str, int]] | None) -> Sample:
        first = pid not in self._procs
        try:
            proc = self._procs.get(pid) or self._procs.setdefault(pid, psutil.Process(pid))
            with proc.oneshot():
                cpu = proc.cpu_percent(None)
                rss = int(proc.memory_info().rss)
                last = self._pss.get(pid)
                if self.pss_interval is not None and (
                    last is None or now - last[0] >= self.pss_interval
                ):
                    full = proc.memory_full_info()
                    last = self._pss[pid] = (now, int(getattr(full, "pss", 0)))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            self._procs.pop(pid, None)
            self._pss.pop(pid, None)
            return Sample(pid=pid, time=now, alive=False)
        except psutil.AccessDenied:  # another user's process: RSS is still readable
            with contextlib.suppress(psutil.Error):
                rss = int(psutil.Process(pid).memory_info().rss)
                return Sample(pid=pid, time=now, rss_bytes=rss)
            return Sample(pid=pid, time=now)
        cards = None if vram is None else vram.get(pid, {})
        return Sample(
            pid=pid,
            time=now,
            rss_bytes=rss,
            pss_bytes=last[1] if last is not None and last[1] else None,
            cpu_percent=None if first else cpu,
            vram_bytes=None if cards is None else sum(cards.values()),
            vram_by_device=cards,
        )

    def close(self) -> None:
        with self._lock:
            self._procs.clear()
            if self._nvml is not None:
                with contextlib.suppress(Exception):
                    self._nvml.nvmlShutdown()
                self._nvml, self._handles = None, []


def _uuid(nvml: Any, handle: Any, index: int) -> str:
    try:
        value = nvml.nvmlDeviceGetUUID(handle)
    except Exception:  # an old driver, or a fake without it: the index still tells them apart
        return str(index)
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, kw_only=True)
class LlamaMetrics:
    """The figures llama-server's ``/metrics`` exposes (tools/server/server-task.cpp)."""

    #: llama-server's average over the requests finished since the previous scrape
    #: (a ``/metrics`` GET resets it): scrape from one place only
    predicted_tokens_seconds: float = 0.0
    prompt_tokens_seconds: float = 0.0
    tokens_predicted_total: float = 0.0
    tokens_predicted_seconds_total: float = 0.0
    prompt_tokens_total: float = 0.0
    requests_processing: float = 0.0
    requests_deferred: float = 0.0

    def tokens_per_second_since(self, earlier: LlamaMetrics, seconds: float) -> float:
        """Tokens generated per wall-clock second between two scrapes (all slots together)."""
        if seconds <= 0:
            return 0.0
        return max(self.tokens_predicted_total - earlier.tokens_predicted_total, 0.0) / seconds


def rss_bytes(pid: int | None) -> int | None:
    """Resident memory of ``pid`` now, or None when there is no such process (or it just
    exited): what ``status()`` and ``ServerInfo.rss`` report between samples."""
    if pid is None:
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.Error, OSError):
        return None


def parse_llama_metrics(text: str) -> LlamaMetrics:
    """Read llama-server's Prometheus text; unknown or missing series are ignored."""
    from prometheus_client.parser import text_string_to_metric_families  # speed

    wanted = set(LlamaMetrics.__dataclass_fields__)
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix("llamacpp:")
            if name in wanted:
                values[name] = float(sample.value)
    return LlamaMetrics(**values)


async def scrape_llama_metrics(
    endpoint: Endpoint,
    *,
    timeout: float = 2.0,  # noqa: ASYNC109 - one HTTP GET; callers want None on timeout
) -> LlamaMetrics | None:
    """GET ``/metrics``; None when the server runs without ``--metrics`` or does not answer."""
    import aiohttp  # speed

    try:
        async with (
            aiohttp.ClientSession(connector=endpoint.connector()) as session,
            session.get(
                f"{endpoint.url}/metrics",
                headers=dict(endpoint.auth()),
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp,
        ):
            if resp.status != 200:  # 501 "This server does not support metrics endpoint"
                return None
            return parse_llama_metrics(await resp.text())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


def timings_tokens_per_second(response: Mapping[str, Any]) -> float | None:
    """Generation speed from a llama-server response's ``timings`` object, if present."""
    timings = response.get("timings")
    if not isinstance(timings, Mapping):
        return None
    value = timings.get("predicted_per_second")
    return float(value) if isinstance(value, int | float) else None
