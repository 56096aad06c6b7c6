"""One request's way to its model's llama-server, and its answer's way back.

:class:`Forwarder` waits for the server to be ready (up to ``ready_timeout``),
sends the request over an ``_upstream`` connection (kept alive in a pool for
answers with a length, fresh for streams) and passes the answer on as
llama-server wrote it, through a :class:`Reply`: to aiohttp's response
(:class:`AiohttpReply`) or straight to the client's transport
(:class:`TransportReply`, the front's fast path). A connection that breaks
before any answer is retried once (a pooled connection to a server that has
just died), never twice (a request that itself crashes the server must not
take down every restart too). Streams asked for by HTTP/1.0 clients, which
cannot take chunked encoding, are re-framed by aiohttp's client and server.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar, cast

import aiohttp
from aiohttp import web

from procman.events import State
from procman.router import _downstream, _upstream
from procman.router._upstream import kept
from procman.router.routes import Dialect, error_body

if TYPE_CHECKING:
    from procman.process.endpoint import Endpoint
    from procman.router._front import Incoming
    from procman.router._guard import Refusal
    from procman.router._router import RouterSettings, Upstream

__all__ = [
    "HOP_BY_HOP", "AiohttpReply", "Failure", "Forwarder", "Reply", "TransportReply",
    "error_response",
]  # fmt: skip

log = logging.getLogger(__name__)

# never forwarded either way: per-connection headers, and ours to set
HOP_BY_HOP = frozenset(
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


@dataclass(frozen=True, slots=True)
class Failure:
    """An error answer, before it is written in the format of the path's API."""

    status: int
    message: str
    kind: str
    code: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


def error_response(failure: Failure | Refusal, dialect: Dialect = Dialect.OPENAI) -> web.Response:
    """An error in the format the API's clients expect (see ``routes.error_body``)."""
    body = error_body(failure.status, failure.message, failure.kind, failure.code, dialect)
    return web.json_response(body, status=failure.status, headers=dict(failure.headers) or None)


R = TypeVar("R")


class Reply(Generic[R]):
    """How an answer reaches the client: through aiohttp, or the front's transport."""

    request: web.Request | None = None
    """The aiohttp request, where there is one (HTTP/1.0 streams need its client)."""
    dialect: Dialect = Dialect.OPENAI
    """The format errors are written in: the API of the path asked for."""

    def fail(self, failure: Failure) -> R:
        """Answer with an error."""
        return self.error(error_response(failure, self.dialect))

    def error(self, response: web.Response) -> R:
        raise NotImplementedError

    async def send(self, answer: _upstream.Answer) -> R:
        raise NotImplementedError


class AiohttpReply(Reply[web.StreamResponse]):
    def __init__(self, request: web.Request) -> None:
        self.request = self._request = request

    def error(self, response: web.Response) -> web.StreamResponse:
        return response

    async def send(self, answer: _upstream.Answer) -> web.StreamResponse:
        return await _downstream.to_response(self._request, answer, HOP_BY_HOP)


class TransportReply(Reply[None]):
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
        headers = kept(response.headers.items(), frozenset({"content-length"}))
        body = response.body if isinstance(response.body, bytes) else b""
        headers += [*self.extra, ("Content-Length", str(len(body)))]
        if self.close:
            headers.append(("Connection", "close"))
        head = _downstream.encode_head(response.status, response.reason, headers)
        self.transport.write(head + body)
        self.keep = not self.close

    async def send(self, answer: _upstream.Answer) -> None:
        self.keep = await _downstream.to_transport(
            self.transport, answer, HOP_BY_HOP, close=self.close, extra=self.extra
        )


class Forwarder:
    """Sends requests to upstreams (see the module docstring); one per router."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.pool = _upstream.Pool()

    async def forward(
        self, incoming: Incoming, reply: Reply[R], upstream: Upstream, *, streamed: bool
    ) -> R:
        """Send ``incoming`` to ``upstream`` once it is ready and ``reply`` with its answer;
        an error answer when it does not get ready in time or the request fails."""
        # answers go through as the bytes llama-server writes, on a kept-alive connection
        # unless streamed; a stream is chunked, which an HTTP/1.0 client cannot take:
        # aiohttp's client and server re-frame it for those
        raw = not streamed or incoming.http11
        pool = None if streamed else self.pool
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.ready_timeout
        resent = False
        while True:
            ready = await upstream.wait_ready(max(0.0, deadline - loop.time()))
            endpoint = upstream.endpoint
            if not ready or endpoint is None:
                return reply.fail(self.unavailable(upstream))
            try:
                if raw:
                    answer = await _upstream.open_stream(
                        endpoint, incoming.method, incoming.target, incoming.headers, incoming.body,
                        connect_timeout=self.settings.connect_timeout,
                        pool=pool,
                    )  # fmt: skip
                    return await reply.send(answer)
                request = reply.request
                if request is None:  # pragma: no cover - the lean front takes HTTP/1.1 only
                    raise RuntimeError("an HTTP/1.0 stream needs aiohttp's request")
                return cast(R, await self.stream_http10(request, endpoint, incoming.body))
            except (aiohttp.ClientConnectorError, ConnectionRefusedError, FileNotFoundError,
                    TimeoutError):  # fmt: skip
                # nothing reached the server (it died after we saw it ready):
                # safe to send again once the supervisor has restarted it
                if loop.time() >= deadline:
                    return reply.fail(self.unavailable(upstream))
                await asyncio.sleep(_RETRY_CONNECT_DELAY)
                continue
            except (aiohttp.ClientConnectionError, _upstream.UpstreamHungUp) as exc:
                # the connection broke before any answer: usually a pooled
                # keep-alive connection to a server that has just died. Sent
                # once more, never twice: a request that itself crashes the
                # server must not take down every restart too.
                if resent:
                    message = f"model {upstream.name!r} failed: {exc}"
                    return reply.fail(Failure(502, message, "server_error", "upstream_error"))
                resent = True
                await asyncio.sleep(_RETRY_CONNECT_DELAY)
                continue
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                message = f"model {upstream.name!r} failed: {exc}"
                return reply.fail(Failure(502, message, "server_error", "upstream_error"))

    def unavailable(self, upstream: Upstream) -> Failure:
        """503: the model failed (with when it may start again), or is not ready."""
        if upstream.state is State.FAILED:
            wait = upstream.retry_in()
            retry = (("Retry-After", str(math.ceil(wait))),) if wait > 0 else ()
            message = f"model {upstream.name!r} failed: {upstream.last_reason}"
            return Failure(503, message, "server_error", "model_failed", retry)
        message = f"model {upstream.name!r} is not ready ({upstream.state}); retry later"
        retry = (("Retry-After", str(self.settings.retry_after)),)
        return Failure(503, message, "server_error", "model_not_ready", retry)

    async def stream_http10(
        self, request: web.Request, endpoint: Endpoint, body: bytes
    ) -> web.StreamResponse:
        """A stream for an HTTP/1.0 client, re-framed by aiohttp's client and server (rare:
        a session of its own)."""
        headers = dict(kept(request.headers.items(), HOP_BY_HOP))
        headers["Accept-Encoding"] = "identity"
        headers.update(endpoint.auth())
        timeout = aiohttp.ClientTimeout(total=None, connect=self.settings.connect_timeout)
        connector = endpoint.connector()
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as session:
            url = f"{endpoint.url}{request.rel_url}"
            response = await session.request(request.method, url, data=body, headers=headers)
            return await _copy(request, response)


async def _copy(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """Copy status, headers and body, each chunk as soon as it arrives."""
    completed = False
    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in kept(upstream.headers.items(), HOP_BY_HOP):
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
