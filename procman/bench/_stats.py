"""Order statistics over repetitions, and what one timed answer yields.

Timings on a shared machine are noisy, so each figure is a median with its
spread (p10/p90 and the quartiles) rather than a mean.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from procman.bench._cases import END, Checkpoint, checkpoint_label

__all__ = ["Sample", "Stats", "percentile", "sample_from_times", "summarize"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True, kw_only=True)
class Stats:
    """Median and spread of one figure over repetitions."""

    n: int
    median: float
    p10: float
    p90: float
    q1: float
    q3: float
    min: float
    max: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def to_json(self) -> dict[str, float | int]:
        return {
            "n": self.n, "median": self.median, "p10": self.p10, "p90": self.p90,
            "q1": self.q1, "q3": self.q3, "min": self.min, "max": self.max,
        }  # fmt: skip


def summarize(values: Sequence[float]) -> Stats | None:
    """Stats of ``values``; None when there are none (a checkpoint never reached)."""
    if not values:
        return None
    return Stats(
        n=len(values),
        median=percentile(values, 50),
        p10=percentile(values, 10),
        p90=percentile(values, 90),
        q1=percentile(values, 25),
        q3=percentile(values, 75),
        min=min(values),
        max=max(values),
    )


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One timed answer; times are milliseconds from sending the request."""

    token_ms: tuple[float, ...]
    """When each token arrived."""
    end_ms: float
    """When the answer was complete."""
    tokens: int
    """Tokens generated, as the server counted them (else the arrivals counted)."""

    @property
    def ttft_ms(self) -> float | None:
        return self.token_ms[0] if self.token_ms else None

    @property
    def tokens_per_s(self) -> float | None:
        """Generation speed after the first token: (arrivals - 1) / (last - first)."""
        if len(self.token_ms) < 2:
            return None
        span = self.token_ms[-1] - self.token_ms[0]
        return (len(self.token_ms) - 1) * 1000.0 / span if span > 0 else None

    def at(self, checkpoint: Checkpoint) -> float | None:
        """Milliseconds at which ``checkpoint`` was reached; None if it never was."""
        if checkpoint == END:
            return self.end_ms
        return self.token_ms[checkpoint - 1] if checkpoint <= len(self.token_ms) else None

    def checkpoints(self, wanted: Sequence[Checkpoint]) -> dict[str, float | None]:
        return {checkpoint_label(cp): self.at(cp) for cp in wanted}

    def to_json(self) -> dict[str, Any]:
        return {
            "ttft_ms": self.ttft_ms,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens_per_s,
            "end_ms": self.end_ms,
            "token_ms": [round(t, 3) for t in self.token_ms],
        }


def sample_from_times(
    start: float, arrivals: Sequence[float], end: float, *, tokens: int | None = None
) -> Sample:
    """A :class:`Sample` from clock readings in seconds (request sent, each token, done)."""
    if any(b < a for a, b in itertools.pairwise(arrivals)):
        raise ValueError("token arrival times must not decrease")
    if arrivals and (arrivals[0] < start or end < arrivals[-1]):
        raise ValueError("token arrivals must lie between the request and the end")
    return Sample(
        token_ms=tuple((t - start) * 1000.0 for t in arrivals),
        end_ms=(end - start) * 1000.0,
        tokens=len(arrivals) if tokens is None else tokens,
    )
