"""Metering, limits and /metrics against real llama-server processes and the demo model.

Numbers worth reporting (RSS against the estimate, the supervisor's own CPU
cost of sampling) are printed; run with ``-s`` to see them. Timing targets
are the bench's (``nox -s bench``), not asserted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from procman import LogSettings, ManagedServer, RestartSettings, ServerSpec
from procman.memory.enforce import LimitAction, LimitSettings, MemoryLimit
from procman.memory.estimate import MiB, estimate
from procman.memory.meter import Meter, scrape_llama_metrics
from procman.models.gguf import validate_model
from procman.router.metrics import MetricsExporter, ServerStats, Snapshot

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

CTX = 2048


def spec(binary: Path, model: Path, logs: Path, name: str = "demo") -> ServerSpec:
    return ServerSpec(
        name=name,
        model=model,
        binary=binary,
        ctx=CTX,
        parallel=1,
        # --metrics: llama-server's own counters; --cache-ram 0: no prompt-cache growth,
        # so the estimate's host_bytes is the whole story
        extra_args=("--metrics", "--cache-ram", "0"),
        startup_timeout=60.0,
        stop_grace=5.0,
        log=LogSettings(directory=logs),
        restart=RestartSettings(backoff_initial=0.1),
    )


@contextlib.asynccontextmanager
async def running(*specs: ServerSpec) -> AsyncIterator[list[ManagedServer]]:
    async with contextlib.AsyncExitStack() as stack:
        servers = [ManagedServer(s) for s in specs]
        await asyncio.wait_for(asyncio.gather(*(stack.enter_async_context(s) for s in servers)), 90)
        yield servers


async def complete(server: ManagedServer, prompt: str, n_predict: int) -> dict[str, object]:
    endpoint = server.endpoint
    assert endpoint is not None
    async with (
        aiohttp.ClientSession(connector=endpoint.connector()) as session,
        session.post(
            f"{endpoint.url}/completion",
            json={"prompt": prompt, "n_predict": n_predict, "temperature": 0},
            timeout=aiohttp.ClientTimeout(total=120),
        ) as resp,
    ):
        assert resp.status == 200
        body: dict[str, object] = await resp.json()
        return body


async def test_meter_rss_cpu_and_tokens_per_second(
    llama_server: Path, demo_model: Path, tmp_path: Path
) -> None:
    predicted = estimate(validate_model(demo_model), ctx=CTX, parallel=1).host_bytes
    meter = Meter()
    async with running(spec(llama_server, demo_model, tmp_path)) as (server,):
        assert server.pid is not None and server.endpoint is not None
        meter.sample([server.pid])
        # a prompt near the slot's size touches the whole compute buffer, as at peak
        await complete(server, " hello" * (CTX - 64), 16)
        sample = meter.sample([server.pid])[server.pid]
        metrics = await scrape_llama_metrics(server.endpoint)
    meter.close()
    print(
        f"\nRSS {sample.rss_bytes / MiB:.1f} MiB, PSS "
        f"{(sample.pss_bytes or 0) / MiB:.1f} MiB, estimate {predicted / MiB:.1f} MiB "
        f"({sample.rss_bytes / predicted - 1:+.1%}); CPU {sample.cpu_percent:.0f}%; "
        f"{metrics.predicted_tokens_seconds if metrics else 0:.1f} tok/s"
    )
    # the estimate's target (test_estimate_real.py checks it against peak RSS)
    assert sample.rss_bytes == pytest.approx(predicted, rel=0.10)
    assert sample.cpu_percent is not None and sample.cpu_percent > 0
    assert metrics is not None and metrics.tokens_predicted_total >= 1
    assert metrics.predicted_tokens_seconds > 0


async def test_limit_below_real_rss_decides_restart_with_the_numbers(
    llama_server: Path, demo_model: Path, tmp_path: Path
) -> None:
    meter = Meter(use_nvml=False)
    async with running(spec(llama_server, demo_model, tmp_path)) as (server,):
        assert server.pid is not None
        rss = meter.sample([server.pid])[server.pid].rss_bytes
        limit = MemoryLimit(LimitSettings(memory_limit=rss // 2, samples=3, seconds=0.4))
        decision = None
        for _ in range(20):
            sample = meter.sample([server.pid])[server.pid]
            decision = limit.observe(sample.time, sample.rss_bytes)
            if decision is not None:
                break
            await asyncio.sleep(0.25)
    assert decision is not None
    print(f"\nlimit decision: {decision.action}: {decision.reason}")
    assert decision.action is LimitAction.RESTART
    assert decision.limit_bytes == rss // 2
    assert decision.used_bytes > decision.limit_bytes and decision.seconds_over >= 0.4
    assert f"> limit {rss // 2 / MiB:.0f} MiB" in decision.reason


async def test_prometheus_text_from_a_real_sample(
    llama_server: Path, demo_model: Path, tmp_path: Path
) -> None:
    meter = Meter()
    async with running(spec(llama_server, demo_model, tmp_path)) as (server,):
        assert server.pid is not None
        meter.sample([server.pid])
        await asyncio.sleep(0.2)
        sample = meter.sample([server.pid])[server.pid]
        stats = ServerStats(
            name=server.name,
            state=server.state,
            rss_bytes=sample.rss_bytes,
            pss_bytes=sample.pss_bytes,
            cpu_percent=sample.cpu_percent,
            vram_bytes=sample.vram_bytes,
            restarts_total=server.restarts,
        )

        class Source:
            def metrics_snapshot(self) -> Snapshot:
                return Snapshot(servers=[stats], admissions_total=1)

        text = MetricsExporter(Source()).render().decode()
    meter.close()
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    demo = (("server", "demo"),)
    assert got[("llamactl_server_rss_bytes", demo)] == sample.rss_bytes
    assert ("llamactl_server_cpu_percent", demo) in got
    assert got[("llamactl_server_state", (("server", "demo"), ("state", "ready")))] == 1
    assert got[("llamactl_server_restarts_total", demo)] == 0
    assert got[("llamactl_admissions_total", ())] == 1


@pytest.mark.slow
async def test_sampling_three_servers_with_and_without_pss(
    llama_server: Path, demo_model: Path, tmp_path: Path
) -> None:
    """Both meters sample live servers. What sampling costs the supervisor is the bench's
    to measure ("Supervisor footprint while idle" in bench/REPORT.md); printed here."""
    specs = [spec(llama_server, demo_model, tmp_path, name=f"m{i}") for i in range(3)]
    async with running(*specs) as servers:
        pids = [s.pid for s in servers if s.pid is not None]
        assert len(pids) == 3
        for label, meter in (
            ("rss+pss", Meter(pss_interval=0)),
            ("rss only", Meter(pss_interval=None)),
        ):
            samples = meter.sample(pids)
            rounds = 20
            cpu = time.process_time()
            for _ in range(rounds):
                samples = meter.sample(pids)
            cpu = time.process_time() - cpu
            meter.close()
            assert sorted(samples) == sorted(pids)
            assert all(s.alive and s.rss_bytes > 0 for s in samples.values())
            if meter.pss_interval is not None:  # where the kernel has smaps_rollup
                assert all(s.pss_bytes for s in samples.values())
            print(f"\n{label}: {cpu / (rounds * 3) * 1e6:.0f} us CPU per server per sample")
