"""Run cases against managed servers, repetitions interleaved across targets.

Every (build, model) target is started first and kept ready; then each
repetition runs every case on every target in turn (A, B, A, B, ...), so
that a burst of noise from another process on the machine lands on all
targets rather than on whichever ran at that moment. One warm-up pass per
target is run and discarded (page cache, first allocation of the KV cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from procman.bench._cases import BenchCase, checkpoint_label
from procman.bench._client import stream_case
from procman.bench._stats import Sample, Stats, summarize
from procman.process.server import ManagedServer
from procman.spec import ServerSpec

__all__ = ["BenchReport", "CaseResult", "Target", "machine_info", "run_bench", "run_bench_sync"]

ProgressCallback = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class Target:
    """One server to measure: a build and a model."""

    label: str
    """Short name in tables and plots, e.g. ``demo@fcc5dc2e``."""
    binary: Path
    model: Path
    build_key: str | None = None
    ctx: int | None = None
    parallel: int | None = 1


@dataclass(kw_only=True)
class CaseResult:
    """All repetitions of one case on one target."""

    target: Target
    case: BenchCase
    samples: list[Sample] = field(default_factory=list)

    def stats(self) -> dict[str, Stats | None]:
        """``ttft_ms``, ``tokens_per_s``, ``tokens`` and each checkpoint, over the samples."""
        out: dict[str, Stats | None] = {
            "ttft_ms": summarize([t for s in self.samples if (t := s.ttft_ms) is not None]),
            "tokens_per_s": summarize(
                [r for s in self.samples if (r := s.tokens_per_s) is not None]
            ),
            "tokens": summarize([float(s.tokens) for s in self.samples]),
        }
        for cp in self.case.checkpoints:
            values = [v for s in self.samples if (v := s.at(cp)) is not None]
            out[checkpoint_label(cp)] = summarize(values)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target.label,
            "build": self.target.build_key,
            "binary": str(self.target.binary),
            "model": str(self.target.model),
            "case": self.case.name,
            "max_tokens": self.case.max_tokens,
            "stats": {k: (v.to_json() if v else None) for k, v in self.stats().items()},
            "samples": [s.to_json() for s in self.samples],
        }


@dataclass(kw_only=True)
class BenchReport:
    results: list[CaseResult]
    repeat: int
    warmup: bool
    started: str
    seconds: float
    machine: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "seconds": round(self.seconds, 3),
            "repeat": self.repeat,
            "warmup": self.warmup,
            "machine": self.machine,
            "results": [r.to_json() for r in self.results],
        }


def machine_info() -> dict[str, Any]:
    """Cores and CPU model: what a reader needs to compare figures between machines."""
    import os  # speed

    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


async def run_bench(
    targets: Sequence[Target],
    cases: Sequence[BenchCase],
    *,
    repeat: int = 5,
    warmup: bool = True,
    log_dir: Path | None = None,
    on_progress: ProgressCallback | None = None,
    request_timeout: float = 600.0,
) -> BenchReport:
    """Start every target, run ``cases`` ``repeat`` times each (interleaved), stop them all."""
    import aiohttp  # speed

    from procman.spec import LogSettings  # speed

    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    say = on_progress or (lambda _msg: None)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.monotonic()
    results = [CaseResult(target=t, case=c) for t in targets for c in cases]
    async with contextlib.AsyncExitStack() as stack:
        servers: list[ManagedServer] = []
        for i, target in enumerate(targets):
            spec = ServerSpec(
                name=f"bench-{i}-{target.label}"[:128].replace("@", "-"),
                model=target.model,
                binary=target.binary,
                ctx=target.ctx,
                parallel=target.parallel,
                log=LogSettings(directory=log_dir),
                listen="tcp",  # measured as clients reach a server: over TCP, with its key
            )
            say(f"starting {target.label}")
            servers.append(await stack.enter_async_context(ManagedServer(spec)))
        # a fresh connection per request: llama-server may close a keep-alive
        # connection after a streamed answer, and a stale one fails the next request
        session = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        )

        async def once(server: ManagedServer, case: BenchCase) -> Sample:
            if server.url is None:  # crashed and not (yet) restarted
                await server.wait_ready(request_timeout)
            endpoint = server.endpoint
            return await stream_case(
                session,
                server.url or "",
                case,
                model=server.name,
                request_timeout=request_timeout,
                headers=dict(endpoint.auth()) if endpoint is not None else {},
            )

        if warmup:
            for target, server in zip(targets, servers, strict=True):
                say(f"warm-up on {target.label}")
                for case in cases:
                    await once(server, case)
        for rep in range(repeat):
            for case in cases:
                for j, server in enumerate(servers):
                    say(f"repetition {rep + 1}/{repeat}: {case.name} on {targets[j].label}")
                    sample = await once(server, case)
                    results[j * len(cases) + cases.index(case)].samples.append(sample)
    return BenchReport(
        results=results,
        repeat=repeat,
        warmup=warmup,
        started=started_at,
        seconds=time.monotonic() - t0,
        machine=machine_info(),
    )


def run_bench_sync(
    targets: Sequence[Target], cases: Sequence[BenchCase], **kwargs: Any
) -> BenchReport:
    """:func:`run_bench` for callers without an event loop."""
    return asyncio.run(run_bench(targets, cases, **kwargs))
