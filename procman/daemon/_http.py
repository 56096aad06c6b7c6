"""The daemon's optional HTTP endpoint: the router over the daemon's own supervisor.

Off unless asked for (``llamactl daemon --http PORT``, ``python -m procman.daemon
--http PORT``). Then the daemon also runs :class:`procman.router.Router` on
127.0.0.1 only: the OpenAI API for every model its clients asked for, the
admin API, and the dashboard at ``/ui``. The daemon is shared by one user's
programs, and its servers are keyed against other local users, so this
endpoint is keyed too: a random key made at each start. ``http.json``
(0600, in the daemon's 0700 folder) holds the URL and the key for this
user's programs, and is removed when the daemon stops. The Host and Origin
rules of every router apply (see :mod:`procman.router._guard`).
"""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from buildtools.paths import write_json_atomic
from procman.errors import PortInUseError

if TYPE_CHECKING:
    from procman.router import Router
    from procman.supervisor import AsyncSupervisor

__all__ = ["DaemonHttp"]

HOST = "127.0.0.1"


class DaemonHttp:
    """The router of one daemon, from :meth:`start` to :meth:`stop`."""

    def __init__(self, supervisor: AsyncSupervisor, info_file: Path, port: int) -> None:
        self._supervisor = supervisor
        self._info_file = info_file
        self._port = port
        self._router: Router | None = None
        self.url: str | None = None

    async def start(self) -> str:
        """Bind (``PortInUseError`` if taken), serve, publish ``http.json``; the base URL."""
        from procman.router import Router, RouterSettings  # speed
        from procman.router.listen import bind_listener  # speed

        try:
            listener = bind_listener(HOST, self._port)
        except PortInUseError as exc:
            exc.hint = f"stop whatever listens on {HOST}:{self._port}, or pass another --http PORT"
            raise
        key = secrets.token_urlsafe(32)
        router = Router(self._supervisor, RouterSettings(api_key=key))
        try:
            await router.start(listener)
        except BaseException:
            listener.close()
            raise
        self._router = router
        host, port = router.address or (HOST, self._port)
        self.url = f"http://{host}:{port}"
        info = {"url": f"{self.url}/v1", "ui": f"{self.url}/ui", "api_key": key}
        write_json_atomic(self._info_file, info)  # owner-only, never half-written
        return self.url

    async def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._info_file.unlink()
        if self._router is not None:
            await self._router.stop()
            self._router = None
