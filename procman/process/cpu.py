"""How many compute threads each llama-server gets when several share the CPU.

llama-server computes with one thread per physical core by default, and
its threads meet at a barrier after every operation, spinning while they
wait. One server alone uses the machine well that way; two or more that
compute at once each start as many threads as there are cores, and a
barrier then waits for a thread the kernel has given to the other server.
Measured on 2 cores with two servers of the demo model, one answering four
clients: a 300-token answer from the other took 4 s with one thread each,
and more than 90 s (10-100x slower, varying run to run) with the default.

So when a supervisor holds several servers that may run at once, each gets
an equal share of the cores (at least one thread); a server alone keeps
llama-server's default. A ``threads`` setting, or ``-t``/``--threads`` in
its extra arguments, always wins.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from procman.spec import ServerSpec

__all__ = ["ThreadShare", "share_cores", "usable_cores"]


@dataclass(frozen=True, slots=True)
class ThreadShare:
    """The spec to start, with ``threads`` decided, and why (empty: nothing to say)."""

    spec: ServerSpec
    reason: str


def usable_cores() -> int:
    """Physical cores this process may run on, as llama-server counts its default threads."""
    import psutil  # speed: only when a second server is admitted

    logical = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity masks
        allowed = logical
    # an affinity mask of N logical CPUs holds at most N physical cores
    return max(1, min(physical, allowed))


def share_cores(spec: ServerSpec, *, servers: int, cores: int) -> ThreadShare:
    """``spec`` with its compute threads for ``servers`` that may run at once on ``cores``."""
    given = spec.threads_given
    if given is not None:
        return ThreadShare(spec, f"threads: {given} (as configured)")
    if servers <= 1:
        return ThreadShare(spec, "")  # alone: llama-server's default, all the cores
    threads = max(1, cores // servers)
    reason = (
        f"threads: {threads} of {cores} core(s), as up to {servers} models may run at once "
        "(set threads to change)"
    )
    return ThreadShare(dataclasses.replace(spec, threads=threads), reason)
