"""Prometheus exposition of llamactl and of every server it runs.

The exporter owns a :class:`~prometheus_client.CollectorRegistry` of its
own: the global default registry belongs to whatever application embeds
llamactl, which may export its own series or run two supervisors.

Nothing here keeps state. At each scrape one collector asks a
:class:`SnapshotSource` for a :class:`Snapshot` of plain values and turns
it into metric families, so a removed server disappears from the output
instead of lingering as a stale labelled gauge, and the supervisor's
internals stay behind one method.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from procman.events import State

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["MetricsExporter", "ServerStats", "Snapshot", "SnapshotSource"]


@dataclass(frozen=True, kw_only=True)
class ServerStats:
    """One server's figures; None where unknown (no process, no NVML, no ``--metrics``)."""

    name: str
    state: State
    rss_bytes: int | None = None
    pss_bytes: int | None = None
    cpu_percent: float | None = None
    vram_bytes: int | None = None
    tokens_per_second: float | None = None
    restarts_total: int = 0
    requests_total: int = 0
    rpc_workers: tuple[tuple[str, bool | None, int], ...] = ()
    """Each RPC worker of the server: (endpoint, up, times the group lost it)."""
    devices: tuple[tuple[str, str, int | None], ...] = ()
    """Each GPU the server was placed on: (NVML index, UUID, bytes NVML measured there)."""


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """Everything exported at one scrape."""

    servers: Sequence[ServerStats] = ()
    #: requests waiting for a model to be loaded or a slot to free, by model name
    queue_depth: Mapping[str, int] = field(default_factory=dict)
    admissions_total: int = 0
    evictions_total: int = 0
    refusals_total: int = 0
    restarts_total: int = 0


class SnapshotSource(Protocol):
    """Whatever can describe the current state (the supervisor, or a test double)."""

    def metrics_snapshot(self) -> Snapshot: ...


_GAUGES = (  # (ServerStats field, metric name suffix, help)
    ("rss_bytes", "rss_bytes", "Resident set size of the llama-server process."),
    ("pss_bytes", "pss_bytes", "Proportional set size (shared model pages split)."),
    ("cpu_percent", "cpu_percent", "CPU use since the previous sample, percent of one core."),
    ("vram_bytes", "vram_bytes", "GPU memory used by the process, summed over GPUs."),
    ("tokens_per_second", "tokens_per_second", "Generation throughput in tokens per second."),
)


def _device_vram(snap: Snapshot) -> Metric:
    from prometheus_client.core import GaugeMetricFamily  # speed

    gauge = GaugeMetricFamily(
        "llamactl_server_device_vram_bytes",
        "GPU memory used by the process on one of the GPUs it was placed on.",
        labels=["server", "gpu", "uuid"],
    )
    for s in snap.servers:
        for index, uuid, used in s.devices:
            if used is not None:
                gauge.add_metric([s.name, index, uuid], float(used))
    return gauge


class _Collector:
    def __init__(self, source: SnapshotSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # speed

        snap = self._source.metrics_snapshot()
        for attr, suffix, doc in _GAUGES:
            gauge = GaugeMetricFamily(f"llamactl_server_{suffix}", doc, labels=["server"])
            for s in snap.servers:
                value = getattr(s, attr)
                if value is not None:
                    gauge.add_metric([s.name], float(value))
            yield gauge
        state = GaugeMetricFamily(
            "llamactl_server_state",
            "1 for the state the server is in, 0 for the others.",
            labels=["server", "state"],
        )
        for s in snap.servers:
            for member in State:
                state.add_metric([s.name, str(member)], 1.0 if member is s.state else 0.0)
        yield state
        for attr, doc in (
            ("restarts_total", "Restarts of this server after a crash or a limit."),
            ("requests_total", "Requests forwarded to this server."),
        ):
            counter = CounterMetricFamily(
                f"llamactl_server_{attr.removesuffix('_total')}", doc, labels=["server"]
            )
            for s in snap.servers:
                counter.add_metric([s.name], float(getattr(s, attr)))
            yield counter
        up = GaugeMetricFamily(
            "llamactl_rpc_worker_up",
            "1 if the RPC worker answers (or serves the leader), 0 if not; absent before a probe.",
            labels=["server", "worker"],
        )
        lost = CounterMetricFamily(
            "llamactl_rpc_worker_lost",
            "Times the group found this RPC worker gone after its leader ended.",
            labels=["server", "worker"],
        )
        for s in snap.servers:
            for endpoint, is_up, times in s.rpc_workers:
                if is_up is not None:
                    up.add_metric([s.name, endpoint], 1.0 if is_up else 0.0)
                lost.add_metric([s.name, endpoint], float(times))
        yield up
        yield lost
        yield _device_vram(snap)
        queue = GaugeMetricFamily(
            "llamactl_queue_depth", "Requests waiting, by model.", labels=["model"]
        )
        for model, depth in sorted(snap.queue_depth.items()):
            queue.add_metric([model], float(depth))
        yield queue
        for attr, doc in (
            ("admissions_total", "Servers admitted within the memory/VRAM budget."),
            ("evictions_total", "Idle servers stopped to make room for another."),
            ("refusals_total", "Servers refused for not fitting the budget."),
            ("restarts_total", "Server restarts, all servers together."),
        ):
            yield CounterMetricFamily(
                f"llamactl_{attr.removesuffix('_total')}", doc, value=float(getattr(snap, attr))
            )


class MetricsExporter:
    """``render()`` gives the text a ``GET /metrics`` should answer with ``content_type``."""

    def __init__(self, source: SnapshotSource) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry  # speed

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(source))
        self.content_type: str = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        from prometheus_client import generate_latest  # speed

        return generate_latest(self.registry)
