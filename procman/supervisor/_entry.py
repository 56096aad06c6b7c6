"""What the supervisor keeps beside each server it holds, and how that reads in its status."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from procman.memory.budget import Need
from procman.process.server import ManagedServer
from procman.spec import ServerSpec

if TYPE_CHECKING:
    from procman.memory.meter import Sample
    from procman.models.pull import PullProgress

__all__ = ["Entry", "Fetch"]

#: downloads the model file before the first start, reporting progress (``resolve_model``)
Fetch = Callable[[Callable[["PullProgress"], None]], Path]


@dataclass(eq=False)
class Entry:
    """Book-keeping beside one server: who uses it, since when it is idle, its timer."""

    server: ManagedServer
    ttl: float | None
    on_demand: bool
    #: as configured: ``gpu_layers = "auto"`` is resolved again at each start
    spec: ServerSpec
    memory_limit: int | None = None
    users: int = 0
    requests: int = 0
    last_used: float = field(default_factory=time.monotonic)
    timer: asyncio.TimerHandle | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: the model file is still to be downloaded (``serve --config`` with an ``hf:`` path)
    fetch: Fetch | None = None
    #: while it downloads: "pulling hf:...: 41% of 4.4 GiB", for ``status()``
    pulling: str | None = None
    #: for ``status()``: its last estimate, when its state last changed (wall clock), why its
    #: process last ended and why it was last refused admission
    need: Need | None = None
    state_since: float = field(default_factory=time.time)
    last_exit: str = ""
    refused: str = ""

    @property
    def loaded(self) -> bool:
        return not self.server.state.is_final

    def row(
        self,
        now: float,
        sample: Sample | None,
        tokens_per_second: float | None,
        devices: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """Its line of :meth:`AsyncSupervisor.status`: ``rss_bytes`` read now, the rest from
        the book-keeping and the last ``sample`` (None until there is one)."""
        from procman.memory.meter import rss_bytes  # speed: psutil, for status only

        server = self.server
        return {
            "name": server.name,
            "aliases": list(server.aliases),
            "state": str(server.state),
            "reason": server.last_reason,
            "pid": server.pid,
            "port": server.port,
            "socket": server.endpoint.socket if server.endpoint is not None else None,
            "model": str(server.spec.model),
            "rss_bytes": rss_bytes(server.pid),
            "restarts": server.restarts,
            "in_use": self.users,
            "idle_seconds": None if self.users else round(now - self.last_used, 3),
            "ttl": self.ttl,
            "on_demand": self.on_demand,
            "pss_bytes": sample.pss_bytes if sample else None,
            "cpu_percent": sample.cpu_percent if sample else None,
            "vram_bytes": sample.vram_bytes if sample else None,
            "tokens_per_second": tokens_per_second,
            "memory_limit": self.memory_limit,
            "rpc_workers": server.workers_status(),
            "devices": devices,
            "pulling": self.pulling,
            "state_since": self.state_since,
            "last_exit": self.last_exit or None,
            "refused": self.refused or None,
            "estimate_bytes": self.need.host_bytes if self.need else None,
            "estimate_vram_bytes": self.need.device_bytes if self.need else None,
        }
