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

Each event also has a kind (:attr:`Event.event`): the change of state it is
(``spawn``, ``ready``, ``crash``...), or, for an event that changes no state,
what it reports (``admitted``, ``refused``, ``evicted``, ``reload``).
:meth:`Event.record` is the one JSON shape an event has outside the process:
``serve --log-format json`` writes it, one per line, and ``GET /admin/events``
streams it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from types import TracebackType
from typing import Any

__all__ = ["EVENT_KINDS", "Event", "EventBus", "State", "Subscription"]

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
    kind: str = ""
    """For an event that changes no state: what it reports (``admitted``, ``refused``,
    ``evicted``, ``reload``); empty for a change of state, whose kind follows from it."""

    @property
    def is_note(self) -> bool:
        """Whether the event reports something (an admission, an eviction...) rather than a
        change of state: ``state`` is then the state the server stays in."""
        return self.state is self.previous

    @property
    def event(self) -> str:
        """The kind of event, one of :data:`EVENT_KINDS` (``note``: a state kept, unnamed)."""
        if self.kind:
            return self.kind
        if self.is_note:
            return "note"
        if self.state is State.READY and self.previous is State.UNHEALTHY:
            return "recovered"
        return _TRANSITIONS[self.state]

    @property
    def level(self) -> str:
        """How loud the event is in a log: ``info``, ``warning`` or ``error``."""
        return EVENT_KINDS.get(self.event, "info")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = str(self.state)
        data["previous"] = str(self.previous)
        return data

    def record(self) -> dict[str, Any]:
        """The event as a log record: one line of ``--log-format json``, one ``/admin/events``
        message. Every key is always present (None when it does not apply)."""
        stamp = datetime.fromtimestamp(self.time, UTC).isoformat(timespec="milliseconds")
        return {
            "time": stamp.replace("+00:00", "Z"),
            "level": self.level,
            "event": self.event,
            "model": self.server,
            "state": str(self.state),
            "previous": str(self.previous),
            "reason": self.reason,
            "pid": self.pid,
            "port": self.port,
            "log_tail": self.log_tail or None,
        }


_TRANSITIONS = {
    State.STARTING: "spawn",
    State.LOADING: "loading",
    State.READY: "ready",
    State.UNHEALTHY: "unhealthy",
    State.RESTARTING: "crash",
    State.STOPPING: "stopping",
    State.STOPPED: "stopped",
    State.FAILED: "failed",
}

#: every kind of event the supervisor emits, with its log level
EVENT_KINDS: dict[str, str] = {
    "spawn": "info",  # a process was started (first life or a restart)
    "loading": "info",  # its /health answers 503: the model loads
    "ready": "info",
    "unhealthy": "warning",  # health checks fail
    "recovered": "info",  # they pass again
    "crash": "warning",  # the process ended (or was killed); a restart follows its backoff
    "failed": "error",  # no more restarts (or the first start failed)
    "stopping": "info",
    "stopped": "info",
    "admitted": "info",  # fits the memory budget (the -ngl choice, what it evicts)
    "refused": "warning",  # does not fit: the request that wanted it gets 503
    "evicted": "warning",  # stopped to make room for another model
    "reload": "info",  # what a config reload did to this model
    "note": "info",
}


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
