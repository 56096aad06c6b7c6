"""The OpenAI-compatible front door: one endpoint, requests routed by ``model``.

The router owns the public socket for the whole life of ``serve``, so a
client never sees a refused connection: while a server is starting or
restarting, requests wait for it (up to ``ready_timeout``) and then get 503
with ``Retry-After``. Responses are relayed chunk by chunk as they arrive
(server-sent events included, nothing is buffered whole), and when a client
goes away its upstream request is closed, which makes llama-server stop
generating for it. Upstream requests go out on raw connections
(``procman.router._upstream``): kept alive in one pool for answers with a length,
fresh for streams; aiohttp's client is left only streams asked for by
HTTP/1.0 clients (no chunked encoding there). Requests arrive through
``procman.router._front``: the proxied POSTs are parsed and answered there, the rest
by this module's aiohttp application.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast, runtime_checkable
from urllib.parse import parse_qs

from aiohttp import web

from procman.errors import AdmissionError, LlamactlError
from procman.events import State
from procman.router._forward import (
    HOP_BY_HOP,
    AiohttpReply,
    Failure,
    Forwarder,
    Reply,
    TransportReply,
    error_response,
)
from procman.router._front import FrontDoor, FrontSettings, Incoming
from procman.router._guard import Guard
from procman.router._logs import Journal, Observed, add_log_routes
from procman.router._upstream import kept
from procman.router.routes import (
    ROUTES,
    ModelFrom,
    Route,
    dialect_of,
    find_route,
    form_field,
)
from procman.router.scheduler import (
    ModelQueue,
    QueueClosedError,
    QueueFullError,
    QueueSettings,
    Scheduler,
)

if TYPE_CHECKING:
    from procman.process.endpoint import Endpoint
    from procman.router.metrics import Snapshot
    from procman.router.replicas import ReplicaSet, ReplicaSets

__all__ = ["Loader", "Metered", "Router", "RouterSettings", "Upstream", "Upstreams"]

log = logging.getLogger(__name__)


#: requests that may wait for a model whose queue is not configured (then: 429)
DEFAULT_QUEUE = 1024


class Upstream(Protocol):
    """What the router needs of a server (``ManagedServer`` is one; tests use fakes)."""

    @property
    def name(self) -> str: ...
    @property
    def aliases(self) -> tuple[str, ...]: ...
    @property
    def state(self) -> State: ...
    @property
    def endpoint(self) -> Endpoint | None: ...
    @property
    def last_reason(self) -> str: ...
    @property
    def pipeline(self) -> int: ...
    def retry_in(self) -> float: ...
    async def wait_ready(self, timeout: float | None = None) -> bool: ...  # noqa: ASYNC109


class Upstreams(Protocol):
    """What the router needs of a supervisor."""

    def find(self, model: str | None) -> Upstream | None: ...
    def upstreams(self) -> Sequence[Upstream]: ...


@runtime_checkable
class Loader(Protocol):
    """What a supervisor that loads models on demand adds (``Supervisor`` is one)."""

    def using(self, name: str) -> AbstractAsyncContextManager[None]: ...
    def on_demand(self, name: str) -> bool: ...
    async def load(self, name: str) -> object: ...
    async def unload(self, name: str, reason: str = ...) -> None: ...
    def status(self) -> list[dict[str, Any]]: ...


@runtime_checkable
class Metered(Protocol):
    """A supervisor that can describe itself for ``GET /metrics`` (``Supervisor`` is one)."""

    def metrics_snapshot(self, queue_depth: Mapping[str, int] | None = None) -> Snapshot: ...


@dataclass(frozen=True, kw_only=True)
class RouterSettings:
    """How the public endpoint behaves."""

    api_key: str | None = field(default=None, repr=False)
    """If set, every endpoint but ``/health`` needs ``Authorization: Bearer <key>`` or
    ``x-api-key: <key>`` (``/metrics`` included: give the scraper the key)."""
    allowed_hosts: tuple[str, ...] = ()
    """``Host`` names accepted beyond loopback and the bound address (``.example.com``:
    it and its subdomains; ``*``: any). Others get 403 (DNS rebinding)."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins that may call the API, e.g. ``http://localhost:3000`` (``*``
    wildcards allowed). Requests from other origins get 403 unless they carry the key."""
    max_connections: int = 512
    """Client connections open at once; idle ones are closed to make room, then 503."""
    head_timeout: float = 10.0
    """Seconds a request head may take from its first byte (then 408)."""
    min_body_rate: int = 8192
    """Bytes per second a request body must keep up after its first 10 s (then 408)."""
    ready_timeout: float = 120.0
    """Seconds a request waits for a starting or restarting server before 503."""
    retry_after: int = 5
    """``Retry-After`` seconds sent with 503."""
    connect_timeout: float = 10.0
    """Seconds to connect to a private server (it is local: this only trips on a hang)."""
    max_body_bytes: int = 64 * 1024 * 1024
    """Largest request body (prompts with images or long documents are big)."""
    shutdown_timeout: float = 2.0
    """Seconds in-flight requests get to finish when the router stops."""


R = TypeVar("R")


class Router:
    """The aiohttp application and its lifecycle: ``async with Router(supervisor) as r:``."""

    def __init__(
        self,
        upstreams: Upstreams,
        settings: RouterSettings | None = None,
        *,
        scheduler: Scheduler | None = None,
        replicas: ReplicaSets | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.replicas = replicas
        """Models served by replicas elsewhere (``[remote.NAME]``), checked before upstreams."""
        self.settings = settings or RouterSettings()
        self.scheduler = scheduler or Scheduler()
        self.loader = upstreams if isinstance(upstreams, Loader) else None
        settings = self.settings
        self.guard = Guard(
            api_key=settings.api_key,
            allowed_hosts=settings.allowed_hosts,
            cors_origins=settings.cors_origins,
        )
        self.forwarder = Forwarder(self.settings)
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.door: FrontDoor | None = None
        """Every open client connection (see :mod:`procman.router._front`), once started."""
        self.address: tuple[str, int] | None = None
        # the front applies the guard to every connection it reads; the middleware is for
        # this application used on its own (tests, an embedding app's own server)
        self.app = web.Application(
            middlewares=[self._guarded], client_max_size=settings.max_body_bytes
        )
        self.app.on_response_prepare.append(self._cors)
        self.app.on_cleanup.append(self._close_pool)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/v1/models", self._models)
        metered = isinstance(upstreams, Metered)
        for route in ROUTES:  # every model endpoint; GET /metrics is ours without ?model=
            if not (metered and route.method == "GET" and route.path == "/metrics"):
                path = f"{route.path}{{rest}}" if route.path.endswith("/") else route.path
                self.app.router.add_route(route.method, path, self._proxy)
        self.journal: Journal | None = None
        """llamactl's own log, if the program keeps one (``GET /admin/logs``)."""
        self.reload: Callable[[], Awaitable[dict[str, Any]]] | None = None
        """Reloads the config this router serves (``POST /admin/reload``), if it has one."""
        if self.loader is not None:
            from procman.router._admin import add_admin_routes, add_reload_route  # speed
            from procman.router._ui import add_ui_routes  # speed

            add_admin_routes(self.app, self.loader, self.scheduler, replicas)
            add_reload_route(self.app, lambda: self.reload)
            add_ui_routes(self.app, getattr(upstreams, "memory", None), self._binaries)
        if isinstance(upstreams, Observed):
            add_log_routes(self.app, upstreams, lambda: self.journal)
        if isinstance(upstreams, Metered):
            from procman.router._admin import add_metrics_route  # speed

            extra = replicas.metrics if replicas else None
            add_metrics_route(
                self.app, upstreams, self.scheduler, per_model=self._proxy, extra=extra
            )

    def _binaries(self) -> dict[str, Path]:
        """Each local model's llama-server (``GET /admin/machine``: its build)."""
        specs = ((s.name, getattr(s, "spec", None)) for s in self.upstreams.upstreams())
        return {name: spec.binary for name, spec in specs if spec is not None}

    async def _close_pool(self, app: web.Application) -> None:
        self.forwarder.pool.close()

    # -- lifecycle ---------------------------------------------------------------
    async def start(self, sock: socket.socket) -> None:
        """Serve on an already bound, listening socket (see
        :func:`procman.router.listen.bind_listener`)."""
        # handler_cancellation: a client that disconnects cancels its handler, which
        # closes the upstream request even while nothing is being written to it
        self._runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=self.settings.shutdown_timeout,
        )
        await self._runner.setup()
        fallback = self._runner.server
        if fallback is None:  # pragma: no cover - setup() made it
            raise RuntimeError("aiohttp's server was not set up")
        name = sock.getsockname()
        self.address = (str(name[0]), int(name[1]))
        self.guard.bind(self.address[0])
        settings = self.settings
        front = FrontSettings(
            skip=HOP_BY_HOP,
            max_body=settings.max_body_bytes,
            max_connections=settings.max_connections,
            head_timeout=settings.head_timeout,
            min_body_rate=settings.min_body_rate,
        )
        # each connection starts at the front, which hands aiohttp what is not its own
        self.door = FrontDoor(front, self.guard, self.answer_raw, fallback)
        self._listener = await asyncio.get_running_loop().create_server(self.door, sock=sock)
        self._sweeper = asyncio.create_task(self.door.sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._listener is not None and self.door is not None:
            self._listener.close()
            self._listener = None
            # requests in flight on the front get the shutdown timeout to finish
            busy = self.door.busy()
            self.door.close_idle()
            if busy:
                _, late = await asyncio.wait(busy, timeout=self.settings.shutdown_timeout)
                for task in late:
                    task.cancel()
            self.door.abort_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Router:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- handlers ------------------------------------------------------------------
    @web.middleware
    async def _guarded(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        headers = request.headers
        refused = self.guard.check_headers(request.path, headers, http11=request.version >= (1, 1))
        answerable = refused is None or refused.code in ("invalid_api_key", "origin_not_allowed")
        if request.method == "OPTIONS" and answerable:
            status, extra = self.guard.preflight(
                host=headers.get("Host"),
                origin=headers.get("Origin"),
                request_headers=headers.get("Access-Control-Request-Headers"),
            )
            return web.Response(status=status, headers=extra)
        if refused is not None:
            return error_response(refused, dialect_of(request.path))
        return await handler(request)

    async def _cors(self, request: web.Request, response: web.StreamResponse) -> None:
        if request.method == "OPTIONS":
            return  # the preflight answer has its own
        headers = request.headers
        for name, value in self.guard.cors_headers(headers.get("Origin"), headers.get("Host")):
            response.headers[name] = value

    async def _health(self, request: web.Request) -> web.Response:
        servers = self.upstreams.upstreams()
        available = {State.READY, State.UNHEALTHY}
        loader = self.loader

        def fine(server: Upstream) -> bool:  # a stopped on-demand model starts when asked for
            if server.state in available:
                return True
            return (
                loader is not None
                and server.state is State.STOPPED
                and loader.on_demand(server.name)
            )

        remote = self.replicas.sets if self.replicas else []
        ok = bool(servers or remote) and all(fine(s) for s in servers)
        ok = ok and all(r.ready for r in remote)
        models = {s.name: {"state": str(s.state), "reason": s.last_reason} for s in servers}
        for r in remote:
            models[r.name] = {"state": "ready" if r.ready else "unavailable", "reason": ""}
        body = {"status": "ok" if ok else "unavailable", "models": models}
        return web.json_response(body, status=200 if ok else 503)

    async def _models(self, request: web.Request) -> web.Response:
        now = int(time.time())
        data = [
            {"id": s.name, "object": "model", "created": now, "owned_by": "llamactl",
             "aliases": list(s.aliases), "state": str(s.state)}
            for s in self.upstreams.upstreams()
        ]  # fmt: skip
        for r in self.replicas.sets if self.replicas else []:
            state = "ready" if r.ready else "unavailable"
            data.append({"id": r.name, "object": "model", "created": now, "owned_by": "llamactl",
                         "aliases": list(r.aliases), "state": state})  # fmt: skip
        return web.json_response({"object": "list", "data": data})

    def _pick(
        self, incoming: Incoming, route: Route
    ) -> tuple[Upstream | ReplicaSet, bool, object] | Failure:
        """The upstream a request names (as its route says it does), whether it asks for
        a stream and its JSON body, or why it cannot be answered."""
        model: object = None
        streamed = False
        payload: Any = None
        match route.model_from:
            case ModelFrom.BODY:
                try:
                    payload = json.loads(incoming.body) if incoming.body else {}
                except ValueError:
                    message = "the request body is not valid JSON"
                    return Failure(400, message, "invalid_request_error")
                except RecursionError:  # Python's parser recurses: ~1000 levels, past any API's
                    message = "the request body's JSON is nested too deeply"
                    return Failure(400, message, "invalid_request_error", "json_too_deep")
                if not isinstance(payload, dict):
                    message = "the request body must be a JSON object"
                    return Failure(400, message, "invalid_request_error")
                model, streamed = payload.get("model"), payload.get("stream") is True
            case ModelFrom.FORM:
                content_type = next(
                    (v for k, v in incoming.headers if k.lower() == "content-type"), ""
                )
                model = form_field(incoming.body, content_type, "model")
                streamed = form_field(incoming.body, content_type, "stream") == "true"
            case ModelFrom.QUERY:
                query = parse_qs(incoming.target.partition("?")[2])
                model = query["model"][-1] if "model" in query else None
        if not isinstance(model, str | None):
            message = "'model' must be a string naming a served model"
            return Failure(400, message, "invalid_request_error")
        remote = self.replicas.find(model) if self.replicas else None
        upstream: Upstream | ReplicaSet | None = remote or self.upstreams.find(model)
        if upstream is None:
            names = ", ".join(s.name for s in self.upstreams.upstreams()) or "none"
            what = f"model {model!r} is not served" if model else "several models are served"
            message = f"{what} (available: {names})"
            return Failure(404, message, "invalid_request_error", "model_not_found")
        return upstream, streamed, payload

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        """A model endpoint reached through aiohttp: HTTP/1.0, a GET with ``?model=``, or
        this application used without the front (see :mod:`procman.router._front`)."""
        body = await request.read()
        incoming = Incoming(
            target=str(request.rel_url),
            headers=kept(request.headers.items(), HOP_BY_HOP),
            body=body,
            http11=request.version >= (1, 1),
            method=request.method,
        )
        return await self._answer(incoming, AiohttpReply(request))

    async def answer_raw(
        self, incoming: Incoming, transport: asyncio.Transport, close: bool
    ) -> bool:
        """Answer a request of the lean front on its transport; True if the connection
        may carry another."""
        reply = TransportReply(transport, close, incoming.cors)
        await self._answer(incoming, reply)
        return reply.keep

    async def _answer(self, incoming: Incoming, reply: Reply[R]) -> R:
        path = incoming.target.partition("?")[0]
        route = incoming.route or find_route(incoming.method, path)
        if route is None:  # pragma: no cover - only routes' paths reach here
            return reply.fail(Failure(404, f"no model endpoint {path}", "invalid_request_error"))
        reply.dialect = route.dialect
        picked = self._pick(incoming, route)
        if isinstance(picked, Failure):
            return reply.fail(picked)
        upstream, streamed, payload = picked
        if self.replicas is not None and self.replicas.owns(upstream):
            return await self._remote(incoming, reply, upstream, streamed, payload)
        server = cast("Upstream", upstream)
        if self.loader is None:
            return await self._queued(incoming, reply, server, streamed)
        async with self.loader.using(server.name):
            return await self._queued(incoming, reply, server, streamed)

    async def _queued(
        self, incoming: Incoming, reply: Reply[R], upstream: Upstream, streamed: bool
    ) -> R:
        """The request's turn in its model's queue, then its answer."""
        queue = self.scheduler.queue(upstream.name) or self._default_queue(upstream)
        try:
            await queue.acquire()
        except QueueFullError as exc:
            retry = (("Retry-After", str(self.settings.retry_after)),)
            return reply.fail(Failure(429, exc.message, "rate_limit_error", "queue_full", retry))
        except QueueClosedError as exc:  # removed by a reload while this request waited
            return reply.fail(Failure(404, exc.message, "invalid_request_error", "model_removed"))
        try:
            if self.loader is not None and self.loader.on_demand(upstream.name):
                if upstream.retry_in() > 0:  # failed by its crashes: not retried before this
                    return reply.fail(self.forwarder.unavailable(upstream))
                try:
                    await self.loader.load(upstream.name)
                except AdmissionError as exc:
                    message = f"model {upstream.name!r} does not fit: {exc.message}"
                    if exc.hint:
                        message += f" ({exc.hint})"
                    return reply.fail(Failure(503, message, "server_error", "over_budget"))
                except LlamactlError as exc:
                    message = f"model {upstream.name!r} could not be loaded: {exc.message}"
                    return reply.fail(Failure(503, message, "server_error", "model_failed"))
            return await self.forwarder.forward(incoming, reply, upstream, streamed=streamed)
        finally:
            queue.release()

    async def _remote(
        self, incoming: Incoming, reply: Reply[R], remote: ReplicaSet, streamed: bool,
        payload: object,
    ) -> R:  # fmt: skip
        """A request for a model served by replicas: its queue, then a replica (late binding)."""
        queue = self.scheduler.queue(remote.name) or self.scheduler.add(
            remote.name, QueueSettings(slots=remote.section.parallel, maxsize=DEFAULT_QUEUE)
        )
        try:
            await queue.acquire()
        except QueueFullError as exc:
            retry = (("Retry-After", str(self.settings.retry_after)),)
            return reply.fail(Failure(429, exc.message, "rate_limit_error", "queue_full", retry))
        try:
            return await remote.forward(
                self.forwarder, incoming, reply, streamed=streamed, payload=payload
            )
        finally:
            queue.release()

    def _default_queue(self, upstream: Upstream) -> ModelQueue:
        """Requests for a model without a configured queue: FIFO, ``upstream.pipeline``
        in flight (see ``ServerSpec.pipeline``), up to ``DEFAULT_QUEUE`` waiting."""
        settings = QueueSettings(slots=upstream.pipeline, maxsize=DEFAULT_QUEUE)
        return self.scheduler.add(upstream.name, settings)
