"""The public endpoint: one OpenAI-compatible front for every model, safe to leave open.

A request's way through: ``_front`` (every connection: a strict HTTP/1.1
parser, deadlines, the connection cap) asks ``_guard`` (Host, Origin and
API-key rules), then hands the proxied POSTs to :class:`Router`
(``_router``: the model a request names, its queue in
:mod:`~procman.router.scheduler`, loading on demand), which ``_forward`` s
them to the model's private llama-server over ``_upstream`` connections and
passes the answer back as llama-server wrote it. Other paths are answered by
aiohttp: ``/health``, ``/v1/models``, the admin API (``_admin``) and
``/metrics`` (:mod:`~procman.router.metrics`). :mod:`~procman.router.listen`
binds the public socket before anything starts.
"""

from __future__ import annotations

from procman._lazy import exports

TYPE_CHECKING = False
if TYPE_CHECKING:
    from procman.router._guard import Guard
    from procman.router._router import (
        Loader,
        Metered,
        Router,
        RouterSettings,
        Upstream,
        Upstreams,
    )
    from procman.router.listen import bind_listener, check_exposure, is_loopback
    from procman.router.metrics import MetricsExporter, ServerStats, Snapshot, SnapshotSource
    from procman.router.scheduler import (
        ModelQueue,
        Order,
        QueueFullError,
        QueueSettings,
        Scheduler,
    )

__all__ = [
    "Guard", "Loader", "Metered", "MetricsExporter", "ModelQueue", "Order", "QueueFullError",
    "QueueSettings", "Router", "RouterSettings", "Scheduler", "ServerStats", "Snapshot",
    "SnapshotSource", "Upstream", "Upstreams", "bind_listener", "check_exposure", "is_loopback",
]  # fmt: skip

__getattr__, __dir__ = exports(
    __name__,
    {
        "Guard": "procman.router._guard",
        **dict.fromkeys(
            ("Loader", "Metered", "Router", "RouterSettings", "Upstream", "Upstreams"),
            "procman.router._router",
        ),
        **dict.fromkeys(
            ("bind_listener", "check_exposure", "is_loopback"), "procman.router.listen"
        ),
        **dict.fromkeys(
            ("MetricsExporter", "ServerStats", "Snapshot", "SnapshotSource"),
            "procman.router.metrics",
        ),
        **dict.fromkeys(
            ("ModelQueue", "Order", "QueueFullError", "QueueSettings", "Scheduler"),
            "procman.router.scheduler",
        ),
    },
)
