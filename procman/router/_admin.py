"""The router's control endpoints: what ``llamactl ps``, ``stop`` and ``load`` talk to.

``GET /admin/status`` lists every configured model (state, pid, private
port, model file, RSS, restarts, queue); ``POST /admin/load/{name}`` starts
one and answers once it is ready; ``POST /admin/unload/{name}`` (or
``/admin/unload`` with no name: all of them) stops it. They sit behind the
same API key as ``/v1``, because unloading is as disruptive as using.

``POST /admin/reload`` reads the config file ``serve --config`` was given
again and applies it (:mod:`procman.reload`), answering what it did.

``GET /admin/status?follow=1`` is the status as server-sent events, with the
memory budget beside it (:mod:`procman.router._ui`, the dashboard's source).

``GET /metrics`` is the Prometheus exposition (:mod:`procman.router.metrics`),
behind the key too: model names and load are not for anyone on the network;
``GET /metrics?model=NAME`` is that model's llama-server's own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from procman.errors import AdmissionError, ConfigError, LlamactlError

if TYPE_CHECKING:
    from procman.router._router import Loader, Metered
    from procman.router.metrics import MetricsExporter
    from procman.router.replicas import ReplicaSets
    from procman.router.scheduler import Scheduler

__all__ = ["add_admin_routes", "add_metrics_route"]


def _error(status: int, message: str, code: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return web.json_response(body, status=status)


def add_admin_routes(
    app: web.Application,
    loader: Loader,
    scheduler: Scheduler,
    replicas: ReplicaSets | None = None,
) -> None:
    def status() -> list[dict[str, object]]:
        queues = scheduler.snapshot()
        return [{**row, "queue": queues.get(str(row["name"]))} for row in loader.status()]

    memory = getattr(loader, "memory", None)  # a supervisor with a budget (the UI's bars)

    def body() -> dict[str, object]:
        if replicas:
            queues = scheduler.snapshot()
            remote = [{**r, "queue": queues.get(str(r["name"]))} for r in replicas.status()]
            return {"models": status(), "remote": remote}
        return {"models": status()}

    def sample() -> dict[str, object]:
        return {**body(), "memory": memory()} if memory is not None else body()

    async def get_status(request: web.Request) -> web.StreamResponse:
        if request.query.get("follow", "").lower() in {"1", "true", "yes"}:
            from procman.router._ui import follow_status  # speed

            return await follow_status(request, sample, getattr(loader, "bus", None))
        return web.json_response(body())

    async def load(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            await loader.load(name)
        except ConfigError as exc:
            return _error(404, exc.message, "model_not_found")
        except AdmissionError as exc:
            return _error(503, exc.message, "over_budget")
        except LlamactlError as exc:
            return _error(503, exc.message, "model_failed")
        return web.json_response({"models": [r for r in status() if r["name"] == name]})

    async def unload(request: web.Request) -> web.Response:
        name = request.match_info.get("name")
        names = [name] if name else [str(row["name"]) for row in loader.status()]
        for each in names:
            try:
                await loader.unload(each, "unloaded via the admin API")
            except ConfigError as exc:
                return _error(404, exc.message, "model_not_found")
        return web.json_response({"models": status()})

    app.router.add_get("/admin/status", get_status)
    app.router.add_post("/admin/load/{name}", load)
    app.router.add_post("/admin/unload", unload)
    app.router.add_post("/admin/unload/{name}", unload)
    if replicas:
        from procman.router.replicas import add_pick_route  # speed

        add_pick_route(app, replicas)


def add_reload_route(
    app: web.Application, reloader: Callable[[], Callable[[], Awaitable[dict[str, Any]]] | None]
) -> None:
    """``POST /admin/reload``: read the config file again and apply it (``llamactl reload``)."""

    async def reload(request: web.Request) -> web.Response:
        run = reloader()
        if run is None:
            message = "this router serves no config file: only `serve --config FILE` reloads"
            return _error(404, message, "no_config")
        try:
            report = await run()
        except LlamactlError as exc:
            message = f"{exc.message} ({exc.hint})" if exc.hint else exc.message
            return _error(400, f"reload refused, nothing changed: {message}", "reload_refused")
        return web.json_response(report)

    app.router.add_post("/admin/reload", reload)


def add_metrics_route(
    app: web.Application,
    source: Metered,
    scheduler: Scheduler,
    *,
    per_model: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None,
    extra: Callable[[], str] | None = None,
) -> None:
    """``GET /metrics``: llamactl's own; with ``?model=NAME``, that server's (``per_model``)."""
    from procman.router.metrics import Snapshot  # speed

    class _WithQueues:  # the supervisor knows the servers, the scheduler the queues
        def metrics_snapshot(self) -> Snapshot:
            depth = {name: int(q["waiting"]) for name, q in scheduler.snapshot().items()}
            return source.metrics_snapshot(depth)

    exporters: list[MetricsExporter] = []  # built on the first scrape: prometheus_client
    # costs ~10 ms to import, on the way from `serve` to its first answer otherwise

    async def metrics(request: web.Request) -> web.StreamResponse:
        if per_model is not None and "model" in request.query:
            return await per_model(request)
        if not exporters:
            from procman.router.metrics import MetricsExporter  # speed

            exporters.append(MetricsExporter(_WithQueues()))
        exporter = exporters[0]
        body = exporter.render()
        if extra is not None:  # the replicas of remote models (procman.router.replicas)
            body += extra().encode()
        response = web.Response(body=body)
        response.headers["Content-Type"] = exporter.content_type
        return response

    app.router.add_get("/metrics", metrics)
