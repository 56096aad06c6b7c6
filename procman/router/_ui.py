"""The dashboard at ``/ui``, and the endpoints it reads that ``/admin`` lacked.

The page (``procman/router/ui/``: HTML, CSS and JavaScript written by hand,
no build step, nothing fetched from elsewhere) holds no data: every figure
it shows comes from the router's documented endpoints, with the key the user
typed into it (kept in the tab's ``sessionStorage`` only), so what the page
can do, any client can. Because a browser cannot send a key with a page it
navigates to, the page's own files are the only paths besides ``/health``
served without the key (:data:`procman.router._guard.PAGE_PATHS`); Host and
Origin rules still apply to them, and their headers forbid framing and any
script, style or connection not from the router itself.

Added here:

* ``GET /admin/status?follow=1[&interval=S]``: the status as server-sent
  events, one message every ``S`` seconds (default 1, 0.2 to 60), each also
  carrying ``memory`` and ``time``. Nothing is sampled while nobody follows.
* ``GET /admin/memory``: budgets, the machine's memory and what each server
  holds against them (:meth:`procman.supervisor.AsyncSupervisor.memory`).
* ``GET /admin/machine``: what ``llamactl detect --json`` finds (probed once,
  at the first request) and, per model, the verified build its binary comes
  from: key, backend, cmake defines and the reason for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from procman.router._logs import stream

if TYPE_CHECKING:
    from procman.events import EventBus

__all__ = ["PAGE_FILES", "add_ui_routes", "build_of", "follow_status"]

_HERE = Path(__file__).with_name("ui")
#: the page's files, by the path they are served at, and their content type
PAGE_FILES = {
    "/ui": ("index.html", "text/html; charset=utf-8"),
    "/ui/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/ui.css": ("ui.css", "text/css; charset=utf-8"),
}
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_INTERVAL = (0.2, 60.0)
#: seconds a status stream waits after a sample before the next, however many events come
_SETTLE = 0.1


def _error(status: int, message: str, code: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return web.json_response(body, status=status)


def _interval(request: web.Request) -> float | web.Response:
    raw = request.query.get("interval", "1")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    low, high = _INTERVAL
    if not low <= value <= high:
        message = f"?interval= must be seconds from {low:g} to {high:g}, got {raw[:40]!r}"
        return _error(400, message, "invalid_parameter")
    return value


def build_of(binary: Path) -> dict[str, Any] | None:
    """The manifest of the verified build ``binary`` belongs to (``builds/KEY/bin/...``)."""
    try:
        manifest = json.loads((binary.parent.parent / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("plan"), dict):
        return None
    plan = manifest["plan"]
    return {
        "key": manifest.get("key"),
        "binary": str(binary),
        "backend": plan.get("backend"),
        "version": manifest.get("version") or plan.get("version"),
        "compiler": manifest.get("compiler"),
        "defines": plan.get("cmake_defines", {}),
        "reasons": plan.get("reasons", {}),
    }


def _machine() -> dict[str, Any]:
    from buildtools.hardware import detect  # speed: probes run at the first request only

    return detect().to_json()


async def follow_status(
    request: web.Request, snapshot: Callable[[], dict[str, Any]], bus: EventBus | None = None
) -> web.StreamResponse:
    """``GET /admin/status?follow=1``: ``snapshot()`` as server-sent events, one every
    ``?interval=`` seconds and one soon after each of ``bus``'s events (a state shown
    changes when it does, not a second later), each with its ``time``. Nothing runs
    while nobody follows."""
    interval = _interval(request)
    if isinstance(interval, web.Response):
        return interval
    changed = asyncio.Event()

    async def samples() -> AsyncIterator[str]:
        while True:
            changed.clear()
            yield json.dumps({"time": time.time(), **snapshot()})
            await asyncio.sleep(_SETTLE)  # a burst of events makes one sample
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), max(interval - _SETTLE, 0))

    unsubscribe = bus.subscribe(lambda event: changed.set()) if bus is not None else None
    try:
        return await stream(request, samples())
    finally:
        if unsubscribe is not None:
            unsubscribe()


def add_ui_routes(
    app: web.Application, memory: Callable[[], dict[str, Any]] | None,
    binaries: Callable[[], Mapping[str, Path]],
) -> None:  # fmt: skip
    """The page, ``/admin/memory`` (``memory()``, if the models have a budget) and
    ``/admin/machine`` (``binaries()``: each model's llama-server)."""
    pages: dict[str, bytes] = {}
    machine: list[asyncio.Future[dict[str, Any]]] = []

    async def page(request: web.Request) -> web.Response:
        name, content_type = PAGE_FILES[request.path]
        if name not in pages:
            pages[name] = await asyncio.to_thread((_HERE / name).read_bytes)
        headers = {**_PAGE_HEADERS, "Content-Type": content_type}
        return web.Response(body=pages[name], headers=headers)

    async def get_memory(request: web.Request) -> web.Response:
        if memory is None:
            return _error(404, "this router's models keep no memory budget", "no_budget")
        return web.json_response(memory())

    async def get_machine(request: web.Request) -> web.Response:
        if not machine:  # probed once, by whichever request comes first
            machine.append(asyncio.ensure_future(asyncio.to_thread(_machine)))
        found = await asyncio.shield(machine[0])
        builds = {name: build_of(path) for name, path in binaries().items()}
        return web.json_response({"machine": found, "builds": builds})

    for path in PAGE_FILES:
        app.router.add_get(path, page)
    app.router.add_get("/admin/memory", get_memory)
    app.router.add_get("/admin/machine", get_machine)
