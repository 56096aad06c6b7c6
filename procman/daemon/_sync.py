"""The blocking facade over the async supervisor, for apps that are not asyncio programs.

::

    with procman.Supervisor() as sup:              # owns its servers; they end with it
        server = sup.serve("model.gguf", ctx=2048) # returns when ready
        server.base_url                            # http://127.0.0.1:PORT/v1

It holds no logic of its own: each method submits the matching coroutine of
:class:`procman.supervisor.Supervisor` (the async core) to a private event
loop and waits for it. That loop runs in one dedicated thread that lives as
long as the facade, because servers are forked from the loop's thread and
Linux's ``PR_SET_PDEATHSIG`` kills a child when the *thread* that forked it
ends (see :mod:`procman.process._child`): a short-lived worker thread would take
the servers with it, and a host process that dies takes them all.

Callbacks (:meth:`Supervisor.on_event`, :meth:`Supervisor.on_log`) are called
**from the loop thread**: keep them short and hand work to your UI thread
(e.g. ``root.after(0, ...)`` in Tk, a queue, ``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from procman.daemon._request import (
    ServeRequest,
    ServerInfo,
    Serving,
    ensure_served,
    server_info,
)
from procman.errors import ServerError
from procman.events import Event, EventBus

if TYPE_CHECKING:
    from procman.supervisor import AsyncSupervisor

__all__ = ["Supervisor"]

T = TypeVar("T")


class Supervisor(Serving):
    """Blocking supervisor: ``serve()`` returns once the model answers; ``close()`` stops all.

    Thread-safe: any thread may call any method. Leaving ``with`` (or
    :meth:`close`, also run at interpreter exit) stops every server
    (SIGTERM, grace, SIGKILL) and ends the loop thread; a call in flight in
    another thread (a GUI's worker waiting in ``serve``) raises
    :class:`~procman.ServerError` instead of waiting forever.
    """

    def __init__(self, *, bus: EventBus | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="procman-supervisor", daemon=True
        )
        self._closed = False
        self._follows: set[concurrent.futures.Future[None]] = set()
        #: calls in flight from any thread; close() cancels them
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._thread.start()
        self._core: AsyncSupervisor = self._call(self._create(bus))
        atexit.register(self.close)

    @staticmethod
    async def _create(bus: EventBus | None) -> AsyncSupervisor:
        from procman.supervisor import AsyncSupervisor  # speed

        return AsyncSupervisor(bus=bus)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._closed:
            coro.close()
            raise ServerError("this supervisor is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        self._pending.add(future)
        try:
            return future.result(timeout)
        except concurrent.futures.CancelledError:
            # close() ended it: a serve() in a worker thread must not wait forever
            raise ServerError("the supervisor was closed while this call ran") from None
        except concurrent.futures.TimeoutError:
            future.cancel()  # the core kills and reaps a half-started server
            raise
        except KeyboardInterrupt:
            future.cancel()
            raise
        finally:
            self._pending.discard(future)

    @property
    def bus(self) -> EventBus:
        return self._core.bus

    @property
    def core(self) -> AsyncSupervisor:
        """The async supervisor underneath; only touch it from coroutines run by :meth:`run`."""
        return self._core

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the supervisor's loop and return its result."""
        return self._call(coro, timeout)

    def serve_request(self, request: ServeRequest) -> ServerInfo:
        """:meth:`serve`'s work: ``ensure_served`` on the core's loop."""
        return self._call(self._serve(request))

    async def _serve(self, request: ServeRequest) -> ServerInfo:
        return server_info(await ensure_served(self._core, request))

    def status(self) -> list[ServerInfo]:
        """A snapshot of every server."""
        return self._call(self._status())

    async def _status(self) -> list[ServerInfo]:
        return [server_info(server) for server in self._core.servers.values()]

    def remove(self, name: str) -> None:
        """Stop a server and forget it."""
        self._call(self._core.remove(name))

    def on_event(self, callback: Callable[[Event], object]) -> Callable[[], None]:
        """Call ``callback(event)`` (from the loop thread) on each state change.

        Returns the unsubscribe function.
        """
        return self._core.bus.subscribe(callback)

    def on_log(self, name: str, callback: Callable[[str], object]) -> Callable[[], None]:
        """Call ``callback(text)`` (from the loop thread) with the server's new log output.

        Returns a function that stops following.
        """
        from procman.process.logs import log_path  # speed

        server = self._core.servers.get(name)
        path = server.log_path if server is not None else log_path(name)

        async def follow() -> None:
            from procman.process.logs import follow  # speed

            async for text in follow(path):
                callback(text)

        future = asyncio.run_coroutine_threadsafe(follow(), self._loop)
        self._follows.add(future)
        future.add_done_callback(self._follows.discard)

        def stop() -> None:
            future.cancel()

        return stop

    def close(self) -> None:
        """Stop every server and end the loop thread; idempotent."""
        if self._closed:
            return
        atexit.unregister(self.close)
        for future in [*self._follows.copy(), *self._pending.copy()]:
            future.cancel()  # a serve() in flight: its half-started server is killed
        try:
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(self._core.stop(), self._loop).result()
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
