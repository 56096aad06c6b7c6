"""llamactl for other programs: the blocking facade, and the daemon many processes share.

* ``_sync``: :class:`procman.Supervisor`, the blocking facade a desktop app
  embeds: the async core on a loop thread of its own;
* :mod:`~procman.daemon.service`: the daemon, one supervisor behind a Unix
  socket for many client processes (``python -m procman.daemon``);
* :mod:`~procman.daemon.client`: :func:`connect`, a client that starts the
  daemon when none runs;
* ``_prepare``: :func:`procman.prepare`, a verified server (built if need be,
  cancellable, with progress) before the first serve;
* ``_inbox``: :class:`procman.Inbox`, callbacks handed to a GUI thread;
* ``_request``: what ``serve(...)`` asks for and what it answers, shared by
  the facade and the daemon.
"""

from __future__ import annotations

from procman._lazy import exports

TYPE_CHECKING = False
if TYPE_CHECKING:
    from procman.daemon._request import ServeRequest, ServerInfo
    from procman.daemon._sync import Supervisor
    from procman.daemon.client import DaemonClient, DaemonStatus, connect
    from procman.daemon.service import Daemon, DaemonPaths, run_daemon

__all__ = [
    "Daemon", "DaemonClient", "DaemonPaths", "DaemonStatus", "ServeRequest", "ServerInfo",
    "Supervisor", "connect", "run_daemon",
]  # fmt: skip

__getattr__, __dir__ = exports(
    __name__,
    {
        **dict.fromkeys(("ServeRequest", "ServerInfo"), "procman.daemon._request"),
        "Supervisor": "procman.daemon._sync",
        **dict.fromkeys(("DaemonClient", "DaemonStatus", "connect"), "procman.daemon.client"),
        **dict.fromkeys(("Daemon", "DaemonPaths", "run_daemon"), "procman.daemon.service"),
    },
)
