"""One llama-server under supervision: its process, address, health, restarts and log.

* :mod:`~procman.process.server`: :class:`ManagedServer`, the async owner of one
  child: spawn, readiness (``/health``), restarts, stop;
* :mod:`~procman.process.policy`: the restart policy, a pure object (what counts
  as a crash, backoff, cooldown);
* :mod:`~procman.process.endpoint`: where a private server listens (a Unix socket
  in a 0700 folder, or a loopback port with its own key);
* :mod:`~procman.process.logs`: the rotating log and the tail kept in memory;
* ``_child`` (process hygiene: own group, death with the parent, polite then firm
  stop), ``_pdeathsig``, ``_sockets`` and ``_early`` (starting the server at
  launch): internals. ``_sockets`` and ``_early`` run before anything heavy is
  imported, so this file imports nothing.
"""

from __future__ import annotations

from procman._lazy import exports

TYPE_CHECKING = False
if TYPE_CHECKING:
    from procman.process.endpoint import Endpoint, Listen
    from procman.process.logs import LineTail, RotatingLog, follow, log_path, read_tail
    from procman.process.policy import Action, Decision, RestartPolicy, is_crash
    from procman.process.server import ManagedServer

__all__ = [
    "Action", "Decision", "Endpoint", "LineTail", "Listen", "ManagedServer", "RestartPolicy",
    "RotatingLog", "follow", "is_crash", "log_path", "read_tail",
]  # fmt: skip

__getattr__, __dir__ = exports(
    __name__,
    {
        **dict.fromkeys(("Endpoint", "Listen"), "procman.process.endpoint"),
        **dict.fromkeys(
            ("LineTail", "RotatingLog", "follow", "log_path", "read_tail"), "procman.process.logs"
        ),
        **dict.fromkeys(
            ("Action", "Decision", "RestartPolicy", "is_crash"), "procman.process.policy"
        ),
        "ManagedServer": "procman.process.server",
    },
)
