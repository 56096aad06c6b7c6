"""Logs and events over HTTP: ``/admin/logs/NAME``, ``/admin/logs``, ``/admin/events``.

``GET /admin/logs/NAME`` answers the last lines of a model's llama-server
log (``?lines=N``, default 100) as text; with ``?follow=1`` it is a
server-sent event stream: those lines, then every line appended, across
rotations (:func:`procman.process.logs.follow`), one line per ``data:``
message. ``GET /admin/logs`` is the same for llamactl's own log (the
:class:`Journal` ``serve`` writes to: what it prints, in its
``--log-format``). ``GET /admin/events`` streams the supervisor's events,
each as :meth:`procman.events.Event.record` in JSON (``?history=N``: the
last N first). They are admin routes: the same Host, Origin and API-key
rules as the rest of the router (:mod:`procman.router._guard`) apply.

A stream sends a comment line every ``KEEPALIVE`` seconds of quiet, so that
proxies keep it open and a client gone is noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from aiohttp import web

if TYPE_CHECKING:
    from procman.events import EventBus

__all__ = ["KEEPALIVE", "Journal", "Observed", "add_log_routes"]

KEEPALIVE = 15.0
_MAX_LINES = 100_000
_DEFAULT_LINES = 100


class Journal:
    """llamactl's own log lines: the last ``keep`` in memory, and followers of new ones."""

    def __init__(self, keep: int = 5000) -> None:
        self._lines: deque[str] = deque(maxlen=keep)
        self._followers: set[asyncio.Queue[str]] = set()

    def write(self, line: str) -> None:
        """Append one line (no newline); a follower that lags by 1000 lines loses the oldest."""
        self._lines.append(line)
        for queue in self._followers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(line)

    def tail(self, lines: int) -> list[str]:
        return list(self._lines)[-lines:] if lines > 0 else []

    async def follow(self, lines: int) -> AsyncIterator[str]:
        """The last ``lines`` lines, then each new one, until the consumer stops."""
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=1000)
        backlog = self.tail(lines)
        self._followers.add(queue)
        try:
            for line in backlog:
                yield line
            while True:
                yield await queue.get()
        finally:
            self._followers.discard(queue)


class _Logged(Protocol):
    @property
    def log_path(self) -> Path: ...


@runtime_checkable
class Observed(Protocol):
    """A supervisor whose servers' logs and events can be read (``AsyncSupervisor`` is one)."""

    bus: EventBus

    @property
    def servers(self) -> Mapping[str, _Logged]: ...


def _error(status: int, message: str, code: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return web.json_response(body, status=status)


def _count(request: web.Request, key: str, default: int) -> int | web.Response:
    raw = request.query.get(key)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > _MAX_LINES:
        message = f"?{key}= must be a whole number from 0 to {_MAX_LINES}, got {raw[:40]!r}"
        return _error(400, message, "invalid_parameter")
    return int(raw)


def _following(request: web.Request) -> bool:
    return request.query.get("follow", "").lower() in {"1", "true", "yes"}


async def _lines_of(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Whole lines out of text that arrives in pieces (a line is sent once it is complete)."""
    partial = ""
    async for chunk in chunks:
        *complete, partial = (partial + chunk).split("\n")
        for line in complete:
            yield line.rstrip("\r")


async def stream(request: web.Request, messages: AsyncIterator[str]) -> web.StreamResponse:
    """Send ``messages`` as server-sent events until the client leaves (or the source ends)."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass each event on at once
        }
    )
    await response.prepare(request)
    pending: asyncio.Queue[str | None] = asyncio.Queue(maxsize=256)

    async def pump() -> None:  # the source waits on its own events; the writer on both
        try:
            async for message in messages:
                await pending.put(message)
        finally:
            await pending.put(None)

    reader = asyncio.create_task(pump())
    try:
        while True:
            try:
                message = await asyncio.wait_for(pending.get(), KEEPALIVE)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if message is None:
                break
            data = "".join(f"data: {part}\n" for part in message.split("\n"))
            await response.write(f"{data}\n".encode())
    except ConnectionError:
        pass  # the client went away
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    return response


def add_log_routes(
    app: web.Application, observed: Observed, journal: Callable[[], Journal | None]
) -> None:
    """The three routes; ``journal()`` is llamactl's own log, if the program keeps one."""

    async def model_log(request: web.Request) -> web.StreamResponse:
        from procman.process.logs import follow, read_tail  # speed: first use only

        name = request.match_info["name"]
        server = observed.servers.get(name)
        if server is None:
            known = ", ".join(observed.servers) or "none"
            return _error(404, f"no model named {name!r} (configured: {known})", "model_not_found")
        lines = _count(request, "lines", _DEFAULT_LINES)
        if isinstance(lines, web.Response):
            return lines
        path = server.log_path
        if _following(request):
            return await stream(request, _lines_of(follow(path, lines=lines)))
        try:
            tail = await asyncio.to_thread(read_tail, path, lines)
        except FileNotFoundError:
            tail = []  # never started: nothing logged yet
        return web.Response(text="".join(f"{line}\n" for line in tail))

    async def own_log(request: web.Request) -> web.StreamResponse:
        kept = journal()
        if kept is None:
            return _error(404, "this router keeps no log of its own", "no_log")
        lines = _count(request, "lines", _DEFAULT_LINES)
        if isinstance(lines, web.Response):
            return lines
        if _following(request):
            return await stream(request, kept.follow(lines))
        return web.Response(text="".join(f"{line}\n" for line in kept.tail(lines)))

    async def events(request: web.Request) -> web.StreamResponse:
        history = _count(request, "history", 0)
        if isinstance(history, web.Response):
            return history
        bus = observed.bus

        async def records() -> AsyncIterator[str]:
            past = list(bus.history)[-history:] if history else []
            async with bus.listen() as subscription:  # listening before the past is sent
                for event in past:
                    yield json.dumps(event.record())
                async for event in subscription:
                    yield json.dumps(event.record())

        return await stream(request, records())

    app.router.add_get("/admin/logs", own_log)
    app.router.add_get("/admin/logs/{name}", model_log)
    app.router.add_get("/admin/events", events)
