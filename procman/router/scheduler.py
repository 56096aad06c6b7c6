"""Per-model request queues: bounded, FIFO or LIFO, one slot per llama-server slot.

Why the router queues at all, when llama-server has its own queue: its queue
is unbounded and strictly first come first served, and a request waiting in
it cannot be told apart from one being generated. Holding requests here, and
letting at most ``slots`` (= the server's ``-np``) through at once, gives a
bound (the next request is refused with 429 at once instead of timing out
minutes later), a choice of order, and cancellation for free: a waiting
request is just a future, so a client that goes away before its turn is
dropped without the server ever seeing it.

Pure asyncio, no I/O: the router holds a slot from dispatch until the last
byte of its response is written.

A config reload (:mod:`procman.reload`) changes a queue in place
(:meth:`ModelQueue.update`), holds it while its model restarts (requests
wait, none is refused for it) and closes the queue of a removed model
(requests in line are answered with :class:`QueueClosedError`), each time
waiting for the requests in flight to finish (:meth:`ModelQueue.drained`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from procman.errors import LlamactlError

__all__ = [
    "ModelQueue", "Order", "QueueClosedError", "QueueFullError", "QueueSettings", "Scheduler",
]  # fmt: skip


class Order(StrEnum):
    """Which waiting request a freed slot goes to (a model's ``order`` in the config)."""

    FIFO = "fifo"
    """The oldest: fair, the usual choice."""
    LIFO = "lifo"
    """The newest: under overload, recent (still-watched) requests finish while old ones wait."""


class QueueFullError(LlamactlError):
    """A model's queue holds ``maxsize`` waiting requests already (HTTP 429)."""

    def __init__(self, name: str, maxsize: int) -> None:
        super().__init__(
            f"model {name!r} has {maxsize} requests waiting already",
            hint="retry later, or raise the model's `queue` setting",
        )
        self.name = name
        self.maxsize = maxsize


class QueueClosedError(LlamactlError):
    """The model was removed (a config reload) before the request's turn came."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"model {name!r} is no longer served: {reason}")
        self.name = name


@dataclass(frozen=True, kw_only=True)
class QueueSettings:
    """How requests for one model wait."""

    slots: int = 1
    """Requests forwarded at once: the server's ``parallel``."""
    maxsize: int = 64
    """Requests that may wait; one more is refused."""
    order: Order = Order.FIFO
    """Which waiting request a freed slot goes to."""

    def __post_init__(self) -> None:
        if self.slots < 1 or self.maxsize < 0:
            raise ValueError("slots must be >= 1 and maxsize >= 0")


class ModelQueue:
    """Slots and waiters for one model: ``async with queue.slot(): ...``."""

    def __init__(self, name: str, settings: QueueSettings | None = None) -> None:
        self.name = name
        self.settings = settings or QueueSettings()
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        #: requests in line (counted, not walked: under overload the line is long)
        self.waiting = 0
        self._held = False
        self._closed: str | None = None
        self._idle: list[asyncio.Future[None]] = []

    async def acquire(self) -> None:
        """Take a slot, waiting in line if none is free; raises :class:`QueueFullError`,
        or :class:`QueueClosedError` once the queue is closed.

        Cancelling a waiting ``acquire`` removes it from the line; if the slot
        was granted in the same instant, it is passed on to the next waiter.
        """
        if self._closed is not None:
            raise QueueClosedError(self.name, self._closed)
        if self.active < self.settings.slots and not self._waiters and not self._held:
            self.active += 1
            return
        if self.waiting >= self.settings.maxsize:
            raise QueueFullError(self.name, self.settings.maxsize)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.waiting += 1
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted, but nobody will use it
            else:
                # release() may have popped and skipped it between the cancel and now
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                self.waiting -= 1
            raise

    def release(self) -> None:
        """Give a slot back; the next waiter (oldest or newest, per ``order``) gets it."""
        self.active -= 1
        self._dispatch()
        if self.active == 0:
            for idle in self._idle:
                if not idle.done():
                    idle.set_result(None)
            self._idle.clear()

    # -- a reload: change, hold, close --------------------------------------------------------
    def update(self, settings: QueueSettings) -> None:
        """New slots, bound and order; requests in line keep their place."""
        self.settings = settings
        self._dispatch()

    def hold(self) -> None:
        """Let no request through (they wait in line) until :meth:`resume`."""
        self._held = True

    def resume(self) -> None:
        self._held = False
        self._dispatch()

    def close(self, reason: str) -> None:
        """Refuse every request from now on, those in line included (the model is gone)."""
        self._closed = reason
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.waiting -= 1
                waiter.set_exception(QueueClosedError(self.name, reason))

    async def drained(self, timeout: float) -> bool:  # noqa: ASYNC109 - a bool, not an error
        """Wait until no request holds a slot; False if some still do after ``timeout``."""
        if self.active == 0:
            return True
        idle = asyncio.get_running_loop().create_future()
        self._idle.append(idle)
        try:
            await asyncio.wait_for(asyncio.shield(idle), timeout)
        except TimeoutError:
            return False
        finally:
            if idle in self._idle:
                self._idle.remove(idle)
        return True

    def _dispatch(self) -> None:
        while not self._held and self.active < self.settings.slots and self._waiters:
            waiter = (
                self._waiters.pop()
                if self.settings.order is Order.LIFO
                else self._waiters.popleft()
            )
            if waiter.done():  # cancelled while in line
                continue
            self.waiting -= 1
            self.active += 1
            waiter.set_result(None)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    def snapshot(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "waiting": self.waiting,
            "slots": self.settings.slots,
            "queue": self.settings.maxsize,
            "order": str(self.settings.order),
        }


class Scheduler:
    """The queues of every configured model, by model name (not alias)."""

    def __init__(self, settings: Mapping[str, QueueSettings] | None = None) -> None:
        self._queues = {name: ModelQueue(name, s) for name, s in (settings or {}).items()}

    def add(self, name: str, settings: QueueSettings) -> ModelQueue:
        queue = self._queues[name] = ModelQueue(name, settings)
        return queue

    def remove(self, name: str) -> None:
        self._queues.pop(name, None)

    def queue(self, name: str) -> ModelQueue | None:
        """The queue for ``name``; ``None`` means requests go straight through."""
        return self._queues.get(name)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: queue.snapshot() for name, queue in self._queues.items()}
