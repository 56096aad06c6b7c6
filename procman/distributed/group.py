"""A llama-server and its RPC workers as one group: when it may start, what a lost worker
means, and the stall watchdog.

:class:`~procman.process.ManagedServer` owns one :class:`WorkerGroup` when its spec
names RPC workers and asks it, at each turn of its life:

* before every spawn, :meth:`WorkerGroup.answer`: every worker must answer a
  probe. Before the group has been ready, one that does not fails the start at
  once (nothing is spawned, so llama-server never aborts on it); once it has
  served, the group waits (``waiting_workers``), probing each second, and the
  leader is not respawned meanwhile: no crash loop. A worker of another protocol
  version is never waited for;
* after the leader ended, :meth:`WorkerGroup.lost`: llama.cpp aborts the leader
  when a worker goes, so an end with a worker gone is the worker's, not a crash;
* while ready, :meth:`WorkerGroup.stalled`: a silent worker blocks llama-server's
  decode, yet its HTTP threads go on answering ``/health``, ``/slots`` and
  ``/metrics`` (measured at b11312). ``/slots`` says how far each busy slot has
  got (prompt tokens processed, tokens decoded): a request in flight whose
  progress has not moved for ``stall_timeout`` seconds is a stall, and so is
  ``/slots`` not answering within it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from procman.distributed.rpc import WorkerProbe, probe_all

if TYPE_CHECKING:
    import aiohttp

__all__ = ["RPC_HINT", "WorkerGroup", "progress"]

log = logging.getLogger(__name__)

#: seconds for which the probes made when a leader ended still stand for its restart
FRESH_PROBE = 1.0
#: seconds between probes of RPC workers a group waits for
WORKER_RETRY = 1.0
RPC_HINT = (
    "start the worker (`llamactl worker` on its machine), check the address, and "
    "`llamactl workers HOST:PORT` to see what answers"
)

Progress = tuple[tuple[int, int, int, int], ...]


def progress(slots: object) -> Progress | None:
    """(slot, task, prompt tokens processed, tokens decoded) of each busy slot in ``/slots``;
    None when no slot is busy (or the answer is not what llama-server writes)."""
    if not isinstance(slots, list):
        return None
    busy = []
    for slot in slots:
        if not isinstance(slot, dict) or not slot.get("is_processing"):
            continue
        decoded = sum(int(t.get("n_decoded", 0)) for t in slot.get("next_token") or [])
        busy.append(
            (
                int(slot.get("id", -1)),
                int(slot.get("id_task", -1)),
                int(slot.get("n_prompt_tokens_processed", 0)),
                decoded,
            )
        )
    return tuple(busy) or None


class WorkerGroup:
    """The RPC workers of one server, and what is known of them."""

    def __init__(self, name: str, endpoints: tuple[str, ...], stall_timeout: float) -> None:
        self.name = name
        self.endpoints = endpoints
        self.stall_timeout = stall_timeout
        self._known: dict[str, dict[str, Any]] = {
            e: {"endpoint": e, "up": None, "error": "", "lost": 0} for e in endpoints
        }
        self._progress: Progress | None = None
        self._progress_since = 0.0
        self._last: tuple[float, list[WorkerProbe]] | None = None

    hint = RPC_HINT

    def status(self, *, serving: bool) -> list[dict[str, Any]]:
        """Each worker: ``up`` (None: not probed yet), the last ``error``, and how many times
        the group has ``lost`` it. While the leader is ``serving``, its workers are up: they
        serve it (and a probe would wait behind it)."""
        return [{**w, "up": True if serving else w["up"]} for w in self._known.values()]

    def _note(self, probes: list[WorkerProbe], *, lost: bool = False) -> None:
        for found in probes:
            known = self._known[found.endpoint]
            known["up"], known["error"] = found.usable, found.error
            if lost and not found.usable:
                known["lost"] += 1

    async def answer(
        self, *, served: bool, waiting: Callable[[str], object], current: Callable[[], str]
    ) -> str | None:
        """Wait until every worker answers; None then, else why the group cannot start.

        ``served``: the group has been ready since this start (else a worker that does
        not answer fails the start at once). ``waiting(reason)`` is called when the group
        starts (or goes on) waiting; ``current()`` gives the reason last reported.
        """
        waited = False
        while True:
            probes = self._fresh() or await probe_all(self.endpoints)
            self._note(probes)
            bad = [p for p in probes if not p.usable]
            if not bad:
                if waited:
                    log.info("%s: every RPC worker answers again", self.name)
                return None
            what = "; ".join(f"RPC worker {p.endpoint}: {p.error}" for p in bad)
            if any(p.answered for p in bad) or not served:
                return what
            if not waited or current() != what:
                waiting(what)
            waited = True
            await asyncio.sleep(WORKER_RETRY)  # a timed re-probe; cancelling stops it

    async def lost(self) -> str:
        """After the leader ended: which workers no longer answer ("" if all do)."""
        probes = await probe_all(self.endpoints)
        self._note(probes, lost=True)
        bad = [p for p in probes if not p.usable]
        if not bad:  # the restart's first answer() takes these; a lost worker is probed again
            self._last = (time.monotonic(), probes)
        return "; ".join(f"RPC worker {p.endpoint} lost ({p.error})" for p in bad)

    def _fresh(self) -> list[WorkerProbe] | None:
        """What :meth:`lost` just found (every worker answering), once, if under
        :data:`FRESH_PROBE` s old: the restart that follows a leader's end does not probe
        every worker twice in a row."""
        last, self._last = self._last, None
        if last is None or time.monotonic() - last[0] > FRESH_PROBE:
            return None
        return last[1]

    def ready(self) -> None:
        """A new leader is ready: its progress is watched from scratch."""
        self._progress = None

    async def stalled(self, session: aiohttp.ClientSession, base: str) -> str:
        """ "" while requests progress, else why the group is restarted (module docstring)."""
        import aiohttp  # speed

        limit = self.stall_timeout
        try:
            async with session.get(
                f"{base}/slots", timeout=aiohttp.ClientTimeout(total=limit)
            ) as resp:
                slots = await resp.json() if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            if isinstance(exc, TimeoutError):
                return f"/slots did not answer within {limit:g} s: llama-server is stalled; killed"
            return ""  # refused or malformed: the health checks and the exit watcher judge that
        now = time.monotonic()
        seen = progress(slots)
        if not seen or seen != self._progress:
            self._progress, self._progress_since = seen, now
            return ""
        if now - self._progress_since < limit:
            return ""
        return (
            f"no progress for {now - self._progress_since:.0f} s on a request in flight: "
            "llama-server is stalled (an RPC worker went silent); killed"
        )
