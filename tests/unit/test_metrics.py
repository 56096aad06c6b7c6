"""The Prometheus text, read back with prometheus_client's own parser."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from procman.events import State
from procman.router.metrics import MetricsExporter, ServerStats, Snapshot


class Source:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def metrics_snapshot(self) -> Snapshot:
        return self.snapshot


SNAPSHOT = Snapshot(
    servers=[
        ServerStats(
            name="demo",
            state=State.READY,
            rss_bytes=180_000_000,
            pss_bytes=170_000_000,
            cpu_percent=12.5,
            vram_bytes=None,
            tokens_per_second=95.0,
            restarts_total=1,
            requests_total=42,
        ),
        ServerStats(name="big", state=State.LOADING),
    ],
    queue_depth={"big": 3},
    admissions_total=2,
    evictions_total=1,
    refusals_total=4,
    restarts_total=1,
)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_every_series_is_exported_and_parses() -> None:
    exporter = MetricsExporter(Source(SNAPSHOT))
    got = samples(exporter.render())
    demo = (("server", "demo"),)
    assert got[("llamactl_server_rss_bytes", demo)] == 180_000_000
    assert got[("llamactl_server_pss_bytes", demo)] == 170_000_000
    assert got[("llamactl_server_cpu_percent", demo)] == 12.5
    assert got[("llamactl_server_tokens_per_second", demo)] == 95
    assert got[("llamactl_server_restarts_total", demo)] == 1
    assert got[("llamactl_server_requests_total", demo)] == 42
    assert got[("llamactl_server_state", (("server", "demo"), ("state", "ready")))] == 1
    assert got[("llamactl_server_state", (("server", "demo"), ("state", "failed")))] == 0
    assert got[("llamactl_server_state", (("server", "big"), ("state", "loading")))] == 1
    assert got[("llamactl_queue_depth", (("model", "big"),))] == 3
    assert got[("llamactl_admissions_total", ())] == 2
    assert got[("llamactl_evictions_total", ())] == 1
    assert got[("llamactl_refusals_total", ())] == 4
    assert got[("llamactl_restarts_total", ())] == 1


def test_unknown_figures_are_left_out_not_zero() -> None:
    got = samples(MetricsExporter(Source(SNAPSHOT)).render())
    assert ("llamactl_server_vram_bytes", (("server", "demo"),)) not in got
    assert ("llamactl_server_rss_bytes", (("server", "big"),)) not in got


def test_each_scrape_reads_a_fresh_snapshot() -> None:
    source = Source(SNAPSHOT)
    exporter = MetricsExporter(source)
    source.snapshot = Snapshot()
    got = samples(exporter.render())
    assert not any(name.startswith("llamactl_server_") for name, _ in got)
    assert got[("llamactl_refusals_total", ())] == 0


def test_own_registry_not_the_global_one() -> None:
    exporter = MetricsExporter(Source(SNAPSHOT))
    assert exporter.registry is not REGISTRY
    assert "llamactl_" not in " ".join(REGISTRY._names_to_collectors)
    assert exporter.content_type.startswith("text/plain")


def test_rpc_workers_are_exported_per_server_and_worker() -> None:
    group = ServerStats(
        name="big",
        state=State.WAITING_WORKERS,
        rpc_workers=(("127.0.0.2:50052", True, 0), ("127.0.0.3:50052", False, 2),
                     ("127.0.0.4:50052", None, 0)),
    )  # fmt: skip
    got = samples(MetricsExporter(Source(Snapshot(servers=[group]))).render())

    def labels(worker: str) -> tuple[tuple[str, str], ...]:
        return (("server", "big"), ("worker", worker))

    assert got[("llamactl_rpc_worker_up", labels("127.0.0.2:50052"))] == 1
    assert got[("llamactl_rpc_worker_up", labels("127.0.0.3:50052"))] == 0
    assert ("llamactl_rpc_worker_up", labels("127.0.0.4:50052")) not in got, "never probed"
    assert got[("llamactl_rpc_worker_lost_total", labels("127.0.0.3:50052"))] == 2
    state = ("llamactl_server_state", (("server", "big"), ("state", "waiting_workers")))
    assert got[state] == 1
