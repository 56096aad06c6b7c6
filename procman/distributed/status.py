"""The worker's status endpoint: what ``llamactl workers`` and health probes read.

The RPC port cannot say whether a worker is busy (a probe waits unanswered in
the backlog while a leader is connected) and says nothing of its devices' names.
``llamactl worker`` therefore also serves, on the next port by default::

    GET /health   200 while ggml-rpc-server listens, else 503
    GET /status   {"version", "endpoint", "state", "protocol", "devices": [...],
                   "busy", "leader_since", "restarts", "pid", "host_memory": {...}}

It is read-only, and obeys the router's rules (:mod:`procman.router._guard`):
only this machine's names in ``Host``, no cross-site pages, and the API key
when one is set. It binds the worker's own address, so it is never more
exposed than the RPC port itself.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from procman.events import State

if TYPE_CHECKING:
    from aiohttp import web

    from procman.distributed.worker import ManagedWorker

__all__ = ["STATUS_PORT_OFFSET", "status_app", "status_document"]

#: the status endpoint listens on the RPC port + this, unless told otherwise
STATUS_PORT_OFFSET = 1


def status_document(worker: ManagedWorker, version: str) -> dict[str, Any]:
    import psutil  # speed

    memory = psutil.virtual_memory()
    doc = {"version": version, "time": time.time(), **worker.to_json()}
    doc["host_memory"] = {"total": memory.total, "available": memory.available}
    # ggml's CPU device reports host memory as of the worker's start: give it as of now
    doc["devices"] = [
        {**d, "free": memory.available} if d["name"] == "CPU" else d for d in doc["devices"]
    ]
    return doc


def status_app(
    worker: ManagedWorker, *, version: str, api_key: str | None, host: str
) -> web.Application:
    from aiohttp import web  # speed

    from procman.router import Guard  # speed

    guard = Guard(api_key=api_key)
    guard.bind(host)

    @web.middleware
    async def guarded(request: web.Request, handler: Any) -> web.StreamResponse:
        refused = guard.check_headers(
            request.path, request.headers, http11=request.version >= (1, 1)
        )
        if refused is not None:
            body = {"error": {"message": refused.message, "code": refused.code}}
            return web.json_response(body, status=refused.status, headers=dict(refused.headers))
        if request.method != "GET":
            return web.json_response({"error": {"message": "read-only: GET only"}}, status=405)
        response: web.StreamResponse = await handler(request)
        return response

    async def health(request: web.Request) -> web.Response:
        ok = worker.state is State.READY
        return web.json_response({"status": str(worker.state)}, status=200 if ok else 503)

    async def status(request: web.Request) -> web.Response:
        return web.json_response(status_document(worker, version), dumps=json.dumps)

    app = web.Application(middlewares=[guarded])
    app.router.add_route("*", "/health", health)
    app.router.add_route("*", "/status", status)
    return app
