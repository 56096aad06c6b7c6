"""Server lifecycle states and the events that report every change of state.

Each transition of a managed server is one :class:`Event` with a wall-clock
time and a human reason. Consumers (the CLI, a desktop UI, a metrics
exporter) subscribe to an :class:`EventBus` with a callback, or iterate it
asynchronously; neither can slow the supervisor down or break it: callbacks
that raise are logged and skipped, and a listener that does not keep up
loses its oldest events rather than growing without bound.

States::

    starting ──▶ loading ──▶ ready ◀──▶ unhealthy
       │            │          │            │
       └────────────┴──────────┴────────────┴──▶ restarting ──▶ starting ...
                                                     ├──▶ failed
                                                     └──▶ waiting_workers ──▶ starting ...
    (any) ──▶ stopping ──▶ stopped
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any

__all__ = ["Event", "EventBus", "State", "Subscription"]

log = logging.getLogger(__name__)


class State(StrEnum):
    """Where a managed server is in its life."""

    STARTING = "starting"
    """Spawned; its HTTP port is not answering yet."""
    LOADING = "loading"
    """HTTP is up and ``/health`` says 503: the model is loading."""
    READY = "ready"
    """``/health`` says 200: requests are forwarded."""
    UNHEALTHY = "unhealthy"
    """Was ready, but recent health checks failed; restarted if it does not recover."""
    RESTARTING = "restarting"
    """It exited or was killed; waiting out the backoff before the next start."""
    WAITING_WORKERS = "waiting_workers"
    """Its RPC workers are not all answering: it is started again once they are."""
    STOPPING = "stopping"
    """Asked to stop: SIGTERM sent, waiting for the grace period."""
    STOPPED = "stopped"
    """Stopped on request, or never started."""
    FAILED = "failed"
    """Gave up: see the event's reason and log tail."""

    @property
    def is_final(self) -> bool:
        return self in {State.STOPPED, State.FAILED}


@dataclass(frozen=True, kw_only=True)
class Event:
    """One transition of one server."""

    server: str
    state: State
    previous: State
    reason: str
    time: float
    """Wall-clock time (``time.time()``) of the transition."""
    pid: int | None = None
    port: int | None = None
    log_tail: str = ""
    """The last lines of the server's output, on failures."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = str(self.state)
        data["previous"] = str(self.previous)
        return data


Callback = Callable[[Event], object]


class Subscription:
    """An async iterator over events published after it was created; close it when done."""

    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self._queue: deque[Event] = deque(maxlen=maxsize)
        self._wakeup = asyncio.Event()
        self._closed = False

    def _push(self, event: Event) -> None:
        self._queue.append(event)  # a full deque drops the oldest
        self._wakeup.set()

    def close(self) -> None:
        self._closed = True
        self._bus._subscriptions.discard(self)
        self._wakeup.set()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._queue.popleft()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EventBus:
    """Fan-out of events to callbacks and async subscriptions, with a short history."""

    def __init__(self, *, history: int = 256) -> None:
        self._callbacks: list[Callback] = []
        self._subscriptions: set[Subscription] = set()
        self.history: deque[Event] = deque(maxlen=history)

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Call ``callback(event)`` for every future event; returns the unsubscribe function."""
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    def listen(self, *, maxsize: int = 1024) -> Subscription:
        """An async iterator of future events: ``async with bus.listen() as events: ...``."""
        subscription = Subscription(self, maxsize)
        self._subscriptions.add(subscription)
        return subscription

    def publish(self, event: Event) -> None:
        self.history.append(event)
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:  # a broken listener must not break supervision
                log.exception("event callback %r failed on %s", callback, event)
        for subscription in list(self._subscriptions):
            subscription._push(event)

    def emit(self, server: str, state: State, previous: State, reason: str, **fields: Any) -> Event:
        """Build an event stamped now, publish it, and return it."""
        event = Event(
            server=server, state=state, previous=previous, reason=reason, time=time.time(), **fields
        )
        self.publish(event)
        return event
