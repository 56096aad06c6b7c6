"""The OpenAI-compatible front door: one endpoint, requests routed by ``model``.

The router owns the public socket for the whole life of ``serve``, so a
client never sees a refused connection: while a server is starting or
restarting, requests wait for it (up to ``ready_timeout``) and then get 503
with ``Retry-After``. Responses are relayed chunk by chunk as they arrive
(server-sent events included, nothing is buffered whole), and when a client
goes away its upstream request is closed, which makes llama-server stop
generating for it. Upstream requests go out on raw connections
(``procman._relay``): kept alive in one pool for answers with a length,
fresh for streams; aiohttp's client is left only streams asked for by
HTTP/1.0 clients (no chunked encoding there). Requests arrive through
``procman._front``: the proxied POSTs are parsed and answered there, the rest
by this module's aiohttp application.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast, runtime_checkable

import aiohttp
from aiohttp import web

from procman import _relay
from procman._front import FrontDoor, FrontSettings, Incoming
from procman._guard import Guard, Refusal
from procman._ports import check_exposure
from procman.errors import AdmissionError, LlamactlError
from procman.events import State
from procman.scheduler import ModelQueue, QueueFullError, QueueSettings, Scheduler

if TYPE_CHECKING:
    from procman._endpoint import Endpoint
    from procman.metrics import Snapshot

__all__ = ["Loader", "Router", "RouterSettings", "Upstream", "Upstreams", "check_exposure"]

log = logging.getLogger(__name__)

#: the OpenAI endpoints forwarded by the body's "model"
PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")

# never forwarded either way: per-connection headers, and ours to set
_HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "trailers", "transfer-encoding", "upgrade", "content-length", "host", "authorization",
        "accept-encoding", "server", "date",
        # the front has answered 100-continue; the body goes on with the request, and
        # llama-server's own interim 100 would be taken for its answer
        "expect",
        # the client's key is ours (llama-server gets its own, or none on its private
        # socket), and so is CORS: llama-server's reflects any Origin it is sent
        "x-api-key", "origin", "access-control-allow-origin",
        "access-control-allow-credentials", "access-control-allow-methods",
        "access-control-allow-headers", "access-control-expose-headers",
        "access-control-max-age",
    }
)  # fmt: skip
_RETRY_CONNECT_DELAY = 0.05
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


def _forwarded(request: web.Request) -> list[tuple[str, str]]:
    """The client's headers that go on to llama-server."""
    return [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]


def _error(
    status: int, message: str, kind: str, code: str | None = None, **headers: str
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers or None)


def _refused(refusal: Refusal) -> web.Response:
    return _error(
        refusal.status, refusal.message, refusal.kind, refusal.code, **dict(refusal.headers)
    )


R = TypeVar("R")


class _Reply(Generic[R]):
    """How an answer reaches the client: through aiohttp, or the lean front's transport."""

    request: web.Request | None = None
    """The aiohttp request, where there is one (HTTP/1.0 streams need its client)."""

    def error(self, response: web.Response) -> R:
        raise NotImplementedError

    async def relay(self, answer: _relay._Answer) -> R:
        raise NotImplementedError


class _AiohttpReply(_Reply[web.StreamResponse]):
    def __init__(self, request: web.Request) -> None:
        self.request = self._request = request

    def error(self, response: web.Response) -> web.StreamResponse:
        return response

    async def relay(self, answer: _relay._Answer) -> web.StreamResponse:
        return await _relay.relay(self._request, answer, _HOP_BY_HOP)


class _RawReply(_Reply[None]):
    def __init__(
        self, transport: asyncio.Transport, close: bool, extra: Sequence[tuple[str, str]]
    ) -> None:
        self.transport = transport
        self.close = close
        self.extra = extra
        """Headers every answer gets (CORS, for a browser origin that may read it)."""
        self.keep = False
        """The connection may carry another request."""

    def error(self, response: web.Response) -> None:
        headers = [(k, v) for k, v in response.headers.items() if k.lower() != "content-length"]
        body = response.body if isinstance(response.body, bytes) else b""
        headers += [*self.extra, ("Content-Length", str(len(body)))]
        if self.close:
            headers.append(("Connection", "close"))
        head = _relay.encode_head(response.status, response.reason, headers)
        self.transport.write(head + body)
        self.keep = not self.close

    async def relay(self, answer: _relay._Answer) -> None:
        self.keep = await _relay.relay_raw(
            self.transport, answer, _HOP_BY_HOP, close=self.close, extra=self.extra
        )


class Router:
    """The aiohttp application and its lifecycle: ``async with Router(supervisor) as r:``."""

    def __init__(
        self,
        upstreams: Upstreams,
        settings: RouterSettings | None = None,
        *,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.settings = settings or RouterSettings()
        self.scheduler = scheduler or Scheduler()
        self.loader = upstreams if isinstance(upstreams, Loader) else None
        settings = self.settings
        self.guard = Guard(
            api_key=settings.api_key,
            allowed_hosts=settings.allowed_hosts,
            cors_origins=settings.cors_origins,
        )
        self._pool = _relay.Pool()
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.door: FrontDoor | None = None
        """Every open client connection (see :mod:`procman._front`), once started."""
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
        for path in PROXIED:
            self.app.router.add_post(path, self._proxy)
        if self.loader is not None:
            from procman._admin import add_admin_routes

            add_admin_routes(self.app, self.loader, self.scheduler)
        if isinstance(upstreams, Metered):
            from procman._admin import add_metrics_route

            add_metrics_route(self.app, upstreams, self.scheduler)

    async def _close_pool(self, app: web.Application) -> None:
        self._pool.close()

    # -- lifecycle ---------------------------------------------------------------
    async def start(self, sock: socket.socket) -> None:
        """Serve on an already bound, listening socket (see ``procman._ports.bind_listener``)."""
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
            fast_paths=frozenset(PROXIED),
            skip=_HOP_BY_HOP,
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
        refused = self.guard.check(
            path=request.path,
            host=headers.get("Host"),
            origin=headers.get("Origin"),
            fetch_site=headers.get("Sec-Fetch-Site"),
            authorization=headers.get("Authorization", ""),
            x_api_key=headers.get("x-api-key", ""),
            http11=request.version >= (1, 1),
        )
        answerable = refused is None or refused.code in ("invalid_api_key", "origin_not_allowed")
        if request.method == "OPTIONS" and answerable:
            status, extra = self.guard.preflight(
                host=headers.get("Host"),
                origin=headers.get("Origin"),
                request_headers=headers.get("Access-Control-Request-Headers"),
            )
            return web.Response(status=status, headers=extra)
        if refused is not None:
            return _refused(refused)
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

        ok = bool(servers) and all(fine(s) for s in servers)
        body = {
            "status": "ok" if ok else "unavailable",
            "models": {s.name: {"state": str(s.state), "reason": s.last_reason} for s in servers},
        }
        return web.json_response(body, status=200 if ok else 503)

    async def _models(self, request: web.Request) -> web.Response:
        now = int(time.time())
        data = [
            {"id": s.name, "object": "model", "created": now, "owned_by": "llamactl",
             "aliases": list(s.aliases), "state": str(s.state)}
            for s in self.upstreams.upstreams()
        ]  # fmt: skip
        return web.json_response({"object": "list", "data": data})

    def _pick(self, body: bytes) -> tuple[Upstream, bool] | web.Response:
        """The upstream a request body names and whether it asks for a stream, or the error."""
        try:
            payload: Any = json.loads(body) if body else {}
        except ValueError:
            return _error(400, "the request body is not valid JSON", "invalid_request_error")
        except RecursionError:  # Python's parser recurses: ~1000 levels, far past any API's
            message = "the request body's JSON is nested too deeply"
            return _error(400, message, "invalid_request_error", "json_too_deep")
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(payload, dict) or not isinstance(model, str | None):
            message = "the request body must be a JSON object with a string 'model'"
            return _error(400, message, "invalid_request_error")
        upstream = self.upstreams.find(model)
        if upstream is None:
            names = ", ".join(s.name for s in self.upstreams.upstreams()) or "none"
            what = f"model {model!r} is not served" if model else "several models are served"
            message = f"{what} (available: {names})"
            return _error(404, message, "invalid_request_error", "model_not_found")
        return upstream, payload.get("stream") is True

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        """The proxied POSTs that reach aiohttp (see :mod:`procman._front` for the rest)."""
        body = await request.read()
        incoming = Incoming(
            target=str(request.rel_url),
            headers=_forwarded(request),
            body=body,
            http11=request.version >= (1, 1),
        )
        return await self._answer(incoming, _AiohttpReply(request))

    async def answer_raw(
        self, incoming: Incoming, transport: asyncio.Transport, close: bool
    ) -> bool:
        """Answer a request of the lean front on its transport; True if the connection
        may carry another."""
        reply = _RawReply(transport, close, incoming.cors)
        await self._answer(incoming, reply)
        return reply.keep

    async def _answer(self, incoming: Incoming, reply: _Reply[R]) -> R:
        picked = self._pick(incoming.body)
        if isinstance(picked, web.Response):
            return reply.error(picked)
        upstream, streamed = picked
        if self.loader is None:
            return await self._queued(incoming, reply, upstream, streamed)
        async with self.loader.using(upstream.name):
            return await self._queued(incoming, reply, upstream, streamed)

    async def _queued(
        self, incoming: Incoming, reply: _Reply[R], upstream: Upstream, streamed: bool
    ) -> R:
        """The request's turn in its model's queue, then its answer."""
        queue = self.scheduler.queue(upstream.name) or self._default_queue(upstream)
        try:
            await queue.acquire()
        except QueueFullError as exc:
            retry = str(self.settings.retry_after)
            return reply.error(
                _error(429, exc.message, "rate_limit_error", "queue_full", **{"Retry-After": retry})
            )
        try:
            if self.loader is not None and self.loader.on_demand(upstream.name):
                if upstream.retry_in() > 0:  # failed by its crashes: not retried before this
                    return reply.error(self._unavailable(upstream))
                try:
                    await self.loader.load(upstream.name)
                except AdmissionError as exc:
                    message = f"model {upstream.name!r} does not fit: {exc.message}"
                    if exc.hint:
                        message += f" ({exc.hint})"
                    return reply.error(_error(503, message, "server_error", "over_budget"))
                except LlamactlError as exc:
                    message = f"model {upstream.name!r} could not be loaded: {exc.message}"
                    return reply.error(_error(503, message, "server_error", "model_failed"))
            return await self._forward(incoming, reply, upstream, streamed=streamed)
        finally:
            queue.release()

    def _default_queue(self, upstream: Upstream) -> ModelQueue:
        """Requests for a model without a configured queue: FIFO, ``upstream.pipeline``
        in flight (see ``ServerSpec.pipeline``), up to ``DEFAULT_QUEUE`` waiting."""
        settings = QueueSettings(slots=upstream.pipeline, maxsize=DEFAULT_QUEUE)
        return self.scheduler.add(upstream.name, settings)

    async def _forward(
        self,
        incoming: Incoming,
        reply: _Reply[R],
        upstream: Upstream,
        *,
        streamed: bool,
    ) -> R:
        # answers go through as the bytes llama-server writes, on a kept-alive connection
        # unless streamed; a stream is chunked, which an HTTP/1.0 client cannot take:
        # aiohttp's client and server re-frame it for those
        raw = not streamed or incoming.http11
        pool = None if streamed else self._pool
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.ready_timeout
        resent = False
        while True:
            ready = await upstream.wait_ready(max(0.0, deadline - loop.time()))
            endpoint = upstream.endpoint
            if not ready or endpoint is None:
                return reply.error(self._unavailable(upstream))
            try:
                if raw:
                    answer = await _relay.open_stream(
                        endpoint, incoming.target, incoming.headers, incoming.body,
                        connect_timeout=self.settings.connect_timeout,
                        pool=pool,
                    )  # fmt: skip
                    return await reply.relay(answer)
                request = reply.request
                if request is None:  # pragma: no cover - the lean front takes HTTP/1.1 only
                    raise RuntimeError("an HTTP/1.0 stream needs aiohttp's request")
                return cast(R, await self._stream_http10(request, endpoint, incoming.body))
            except (aiohttp.ClientConnectorError, ConnectionRefusedError, FileNotFoundError,
                    TimeoutError):  # fmt: skip
                # nothing reached the server (it died after we saw it ready):
                # safe to send again once the supervisor has restarted it
                if loop.time() >= deadline:
                    return reply.error(self._unavailable(upstream))
                await asyncio.sleep(_RETRY_CONNECT_DELAY)
                continue
            except (aiohttp.ClientConnectionError, _relay.UpstreamHungUp) as exc:
                # the connection broke before any answer: usually a pooled
                # keep-alive connection to a server that has just died. Sent
                # once more, never twice: a request that itself crashes the
                # server must not take down every restart too.
                if resent:
                    message = f"model {upstream.name!r} failed: {exc}"
                    return reply.error(_error(502, message, "server_error", "upstream_error"))
                resent = True
                await asyncio.sleep(_RETRY_CONNECT_DELAY)
                continue
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                message = f"model {upstream.name!r} failed: {exc}"
                return reply.error(_error(502, message, "server_error", "upstream_error"))

    def _unavailable(self, upstream: Upstream) -> web.Response:
        if upstream.state is State.FAILED:
            wait = upstream.retry_in()
            retry = {"Retry-After": str(math.ceil(wait))} if wait > 0 else {}
            message = f"model {upstream.name!r} failed: {upstream.last_reason}"
            return _error(503, message, "server_error", "model_failed", **retry)
        return _error(
            503, f"model {upstream.name!r} is not ready ({upstream.state}); retry later",
            "server_error", "model_not_ready", **{"Retry-After": str(self.settings.retry_after)},
        )  # fmt: skip

    async def _stream_http10(
        self, request: web.Request, endpoint: Endpoint, body: bytes
    ) -> web.StreamResponse:
        """A stream for an HTTP/1.0 client, re-framed by aiohttp's client and server (rare:
        a session of its own)."""
        headers = dict(_forwarded(request))
        headers["Accept-Encoding"] = "identity"
        headers.update(endpoint.auth())
        timeout = aiohttp.ClientTimeout(total=None, connect=self.settings.connect_timeout)
        connector = endpoint.connector()
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as session:
            url = f"{endpoint.url}{request.rel_url}"
            response = await session.post(url, data=body, headers=headers)
            return await self._relay(request, response)

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        """Copy status, headers and body, each chunk as soon as it arrives."""
        completed = False
        try:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP_BY_HOP:
                    response.headers.add(key, value)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except aiohttp.ClientPayloadError as exc:
                # the server died mid-answer: the headers are out, so cut the
                # connection rather than end the body cleanly as if complete
                log.warning("upstream %s broke off: %s", request.path, exc)
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write_eof()
            completed = True
            return response
        finally:
            # closing an unfinished response drops its connection, which is how
            # llama-server learns that the client is gone and stops generating
            if completed:
                upstream.release()
            else:
                upstream.close()
