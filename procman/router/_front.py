"""The router's front door: every request is read, checked and framed here first.

Each connection starts at a :class:`Front`, which reads one whole request at
a time with a strict HTTP/1.1 parser (:mod:`procman.router._http1`): what a strict
parser refuses is answered at once with 400, 413, 431, 501 or 505 and the
connection closed, never handed on. The head must arrive within
``head_timeout`` of its first byte and a body keep ``min_body_rate`` after a
grace period (else 408), idle connections close after ``keepalive``, and at
most ``max_connections`` are open (idle ones are closed to make room, then
new ones refused with 503). The access rules (:class:`procman.router._guard.Guard`:
Host, Origin, API key) are applied to every request here, and ``OPTIONS`` is
answered here.

A request that is the common case, a POST to one of the proxied paths in
HTTP/1.1, is then answered through the ``answer`` callable, its response
written straight to the transport: aiohttp's server costs the router more
CPU than everything else it does (a one-token completion: ~440 µs of CPU at
16 clients and ~810 µs one at a time through aiohttp on 2 cores, ~260 and
~460 µs here; a raw byte relay: ~245 and ~375). Anything else (other paths,
HTTP/1.0) is handed, whole and re-framed with a ``Content-Length`` and
``Connection: close``, to aiohttp's protocol, which answers that one request.

A client that disconnects cancels its request's task, which aborts the
upstream request (as ``handler_cancellation`` does in aiohttp).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import cast

from procman.router._guard import Guard, Refusal
from procman.router._http1 import MAX_HEAD, Dechunker, Head, bad, parse_head
from procman.router._upstream import kept
from procman.router.routes import Dialect, Route, dialect_of, error_body, find_route

__all__ = ["Front", "FrontDoor", "FrontSettings", "Incoming"]

log = logging.getLogger(__name__)

#: bytes of a next (pipelined) request buffered while one is answered
_MAX_AHEAD = 256 * 1024
_LINGER = 2.0
#: the sweeper's period: deadlines are met within this
_SWEEP = 0.5
_CAP_LOG_EVERY = 10.0

_REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 408: "Request Timeout", 413: "Content Too Large",
    417: "Expectation Failed", 431: "Request Header Fields Too Large", 501: "Not Implemented",
    503: "Service Unavailable", 505: "HTTP Version Not Supported",
}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class FrontSettings:
    """What the front needs of the router's settings."""

    skip: frozenset[str]
    """Request headers (lowercase) never passed on to llama-server."""
    max_body: int
    max_connections: int = 512
    head_timeout: float = 10.0
    body_grace: float = 10.0
    min_body_rate: int = 8192
    keepalive: float = 75.0


@dataclass(frozen=True, slots=True)
class Incoming:
    """A proxied request, whichever front received it."""

    target: str
    """Path and query, as sent."""
    headers: list[tuple[str, str]]
    """The client's headers that go on to llama-server."""
    body: bytes
    http11: bool = True
    cors: tuple[tuple[str, str], ...] = ()
    """Headers the answer gets for the browser that asked (see ``Guard.cors_headers``)."""
    method: str = "POST"
    route: Route | None = None
    """The model endpoint (:mod:`procman.router.routes`); None: found from the target."""


class _Stage(enum.Enum):
    IDLE = "idle"  # between requests: nothing of the next one read yet
    HEAD = "head"  # the head is arriving
    BODY = "body"  # the body is arriving
    BUSY = "busy"  # a request is being answered
    HANDED = "handed"  # aiohttp's protocol owns the connection
    LINGER = "linger"  # refused: the answer is out, the rest is read and dropped


Answer = Callable[[Incoming, asyncio.Transport, bool], Awaitable[bool]]


class FrontDoor:
    """Every open connection: the protocol factory, the cap, and the deadline sweeper.

    ``answer(incoming, transport, close)`` answers a fast-path request on the
    transport and returns whether the connection may carry another;
    ``fallback()`` makes aiohttp's protocol for the rest.
    """

    def __init__(
        self,
        settings: FrontSettings,
        guard: Guard,
        answer: Answer,
        fallback: Callable[[], asyncio.Protocol],
    ) -> None:
        self.settings = settings
        self.guard = guard
        self.answer = answer
        self.fallback = fallback
        self.connections: set[Front] = set()
        self.refused = 0
        self._cap_logged = float("-inf")

    def __call__(self) -> Front:
        return Front(self)

    def admit(self, front: Front, now: float) -> bool:
        """Make room for a new connection (closing the longest idle), or say there is none."""
        if len(self.connections) < self.settings.max_connections:
            self.connections.add(front)
            return True
        idle = [f for f in self.connections if f.stage is _Stage.IDLE and not f.buffer]
        if idle:
            oldest = min(idle, key=lambda f: f.last_active)
            oldest.close()
            self.connections.discard(oldest)
            self.connections.add(front)
            return True
        self.refused += 1
        self.connections.add(front)  # refused with 503: the sweeper ends its linger
        if now - self._cap_logged >= _CAP_LOG_EVERY:
            self._cap_logged = now
            log.warning(
                "connection cap reached: %d connections open, none idle; refusing new ones "
                "with 503 (%d so far); raise max_connections if this load is expected",
                len(self.connections),
                self.refused,
            )
        return False

    async def sweep(self, every: float = _SWEEP) -> None:
        """Enforce every connection's deadline, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            for front in list(self.connections):
                front.check_deadline(now)

    def busy(self) -> list[asyncio.Task[None]]:
        return [f.task for f in self.connections if f.task is not None]

    def close_idle(self) -> None:
        for front in list(self.connections):
            front.close()

    def abort_all(self) -> None:
        for front in list(self.connections):
            if front.transport is not None and front.stage is not _Stage.HANDED:
                front.transport.abort()


class Front(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.stage = _Stage.IDLE
        self._head: Head | None = None
        self._body_at = 0  # where the body starts in the buffer
        self._chunks: Dechunker | None = None
        self._paused = False
        self._inner: asyncio.Protocol | None = None
        self._dialect = Dialect.OPENAI
        """The error format of the request being refused (its path's API)."""
        self.since = 0.0
        """Loop time the current stage began."""
        self.last_active = 0.0
        """Loop time of the last byte received or answer sent."""

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # TCP_NODELAY is already set: uvloop and asyncio set it on every TCP transport
        self.transport = cast("asyncio.Transport", transport)
        now = self.since = self.last_active = asyncio.get_running_loop().time()
        if not self.door.admit(self, now):
            self._refuse(Refusal(503, "too many open connections; retry later", "overloaded"))

    def data_received(self, data: bytes) -> None:
        stage = self.stage
        if stage is _Stage.HANDED or stage is _Stage.LINGER:
            return  # aiohttp has its whole request; or refused: dropped
        self.buffer += data
        now = self.last_active = asyncio.get_running_loop().time()
        if stage is _Stage.BUSY:
            if len(self.buffer) > _MAX_AHEAD and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
            return
        if stage is _Stage.IDLE:
            self.stage, self.since = _Stage.HEAD, now
        self._advance()

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            return self._inner.eof_received()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.door.connections.discard(self)
        if self.task is not None:
            self.task.cancel()  # the client has gone: its upstream request is aborted
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # -- reading a request ------------------------------------------------------------------
    def _advance(self) -> None:
        """Take as much of the next request as has arrived; act once it is whole."""
        if self.transport is None or self.transport.is_closing():
            return
        head = self._head
        if head is None:
            head = self._read_head()
            if head is None:
                return
        if head.chunked:
            chunks = self._chunks
            if chunks is None:  # pragma: no cover - _read_head made it
                return
            refused = chunks.feed(self.buffer)
            if refused is not None:
                self._refuse(refused)
                return
            if not chunks.done:
                return
            body, rest = bytes(chunks.body), chunks.pos
        else:
            rest = self._body_at + head.length
            if len(self.buffer) < rest:
                return  # the body is still coming
            body = bytes(self.buffer[self._body_at : rest])
        del self.buffer[:rest]
        self._head, self._chunks = None, None
        self._dispatch(head, body)

    def _read_head(self) -> Head | None:
        buffer = self.buffer
        self._dialect = Dialect.OPENAI  # until the path says otherwise
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD:
                self._refuse(bad(f"the request head is over {MAX_HEAD} bytes", 431))
            elif buffer.count(b"\n") > buffer.count(b"\r\n"):
                self._refuse(bad("bare LF in the request head (lines must end in CRLF)"))
            return None
        if end > MAX_HEAD:
            self._refuse(bad(f"the request head is over {MAX_HEAD} bytes", 431))
            return None
        door = self.door
        parsed = parse_head(bytes(buffer[:end]), door.settings.max_body)
        if isinstance(parsed, Refusal):
            self._refuse(parsed)
            return None
        self._dialect = dialect_of(parsed.path)
        refused = door.guard.check(
            path=parsed.path,
            host=parsed.host,
            origin=parsed.origin,
            fetch_site=parsed.fetch_site,
            authorization=parsed.authorization,
            x_api_key=parsed.x_api_key,
            http11=parsed.http11,
        )
        # a preflight carries no key: the origin decides (a foreign one gets 403 there)
        answerable = refused is None or refused.code in ("invalid_api_key", "origin_not_allowed")
        if parsed.method == "OPTIONS" and answerable:
            status, headers = door.guard.preflight(
                host=parsed.host, origin=parsed.origin, request_headers=parsed.preflight_headers
            )
            close = parsed.close or parsed.chunked or parsed.length > 0
            self._write_plain(status, headers, close=close)
            return None
        if refused is not None:
            self._refuse(refused)
            return None
        self._head, self._body_at = parsed, end + 4
        self.stage, self.since = _Stage.BODY, asyncio.get_running_loop().time()
        if parsed.chunked:
            self._chunks = Dechunker(door.settings.max_body)
            self._chunks.pos = self._body_at
        whole = not parsed.chunked and len(buffer) >= self._body_at + parsed.length
        if parsed.expect and not whole and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return parsed

    def _dispatch(self, head: Head, body: bytes) -> None:
        door = self.door
        route = find_route(head.method, head.path) if head.method == "POST" else None
        if route is None or not head.http11:
            self._hand_over(head, body)
            return
        skip = door.settings.skip
        incoming = Incoming(
            target=head.target,
            headers=kept(head.headers, skip),
            body=body,
            cors=tuple(door.guard.cors_headers(head.origin, head.host)),
            route=route,
        )
        self.stage = _Stage.BUSY
        self.task = asyncio.get_running_loop().create_task(self._serve(incoming, head.close))

    async def _serve(self, incoming: Incoming, close: bool) -> None:
        transport = self.transport
        if transport is None:  # pragma: no cover - _advance runs after connection_made
            return
        keep = False
        try:
            keep = await self.door.answer(incoming, transport, close)
        except asyncio.CancelledError:
            return  # the client left: connection_lost cancelled us
        except Exception:  # a bug must cost one connection, not the router
            log.exception("request %s failed", incoming.target)
            transport.abort()
            return
        finally:
            self.task = None
            self.stage = _Stage.IDLE
            self.since = self.last_active = asyncio.get_running_loop().time()
        if not keep or transport.is_closing():
            transport.close()
            return
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if self.buffer:
            self.stage = _Stage.HEAD
            self._advance()

    def _hand_over(self, head: Head, body: bytes) -> None:
        """Give aiohttp's protocol this one request, re-framed; the connection ends with it."""
        transport = self.transport
        if transport is None:  # pragma: no cover - _advance runs after connection_made
            return
        dropped = {"content-length", "transfer-encoding", "expect", "connection", "keep-alive"}
        version = "HTTP/1.1" if head.http11 else "HTTP/1.0"
        lines = [f"{head.method} {head.target} {version}"]
        lines += [f"{k}: {v}" for k, v in head.headers if k.lower() not in dropped]
        lines += [f"Content-Length: {len(body)}", "Connection: close"]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
        self.buffer.clear()  # pipelined requests after this one are not answered
        self.stage = _Stage.HANDED
        protocol = self._inner = self.door.fallback()
        protocol.connection_made(transport)
        if self._paused:
            self._paused = False
            transport.resume_reading()
        protocol.data_received(data)

    # -- answering here ---------------------------------------------------------------------
    def _write_plain(self, status: int, headers: Iterable[tuple[str, str]], *, close: bool) -> None:
        """An answer without a body (a preflight); the connection stays if it may."""
        if self.transport is None:
            return
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}", *map(": ".join, headers)]
        lines += ["Content-Length: 0"] + (["Connection: close"] if close else [])
        del self.buffer[: self.buffer.find(b"\r\n\r\n") + 4]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace"))
        if close:
            self._linger()
            return
        self.stage = _Stage.IDLE
        self.since = self.last_active = asyncio.get_running_loop().time()
        if self.buffer:
            self.stage = _Stage.HEAD
            self._advance()

    def _refuse(self, refusal: Refusal) -> None:
        """Answer with the refusal and close: what follows in the stream cannot be trusted."""
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(error_bytes(refusal, dialect=self._dialect))
        self._linger()

    def _linger(self) -> None:
        """Close after the answer, reading (and dropping) what the client still sends for a
        moment: closing with unread bytes would reset the connection before it reads it."""
        transport = self.transport
        self.buffer.clear()
        self._head, self._chunks = None, None
        self.stage, self.since = _Stage.LINGER, asyncio.get_running_loop().time()
        if transport is None:
            return
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    # -- deadlines --------------------------------------------------------------------------
    def check_deadline(self, now: float) -> None:
        """Called by the sweeper: close or refuse a connection that has overstayed."""
        settings, stage = self.door.settings, self.stage
        if stage is _Stage.IDLE:
            if now - self.last_active > settings.keepalive:
                self.close()
        elif stage is _Stage.HEAD:
            if now - self.since > settings.head_timeout:
                timeout = Refusal(408, "the request head took too long", "request_timeout")
                self._refuse(timeout)
        elif stage is _Stage.BODY:
            late = now - self.since - settings.body_grace
            if late > 0 and len(self.buffer) - self._body_at < settings.min_body_rate * late:
                slow = f"the body arrives slower than {settings.min_body_rate} bytes/s"
                self._refuse(Refusal(408, slow, "request_timeout"))
        elif stage is _Stage.LINGER and now - self.since > _LINGER and self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Close the connection if no request is being read or answered on it."""
        if self.stage is _Stage.IDLE and not self.buffer and self.transport is not None:
            self.transport.close()


def error_bytes(
    refusal: Refusal, *, close: bool = True, dialect: Dialect = Dialect.OPENAI
) -> bytes:
    """A whole answer for ``refusal``: the API's error body, ``Connection: close``."""
    error = error_body(refusal.status, refusal.message, refusal.kind, refusal.code, dialect)
    body = json.dumps(error).encode()
    lines = [
        f"HTTP/1.1 {refusal.status} {_REASONS.get(refusal.status, 'Error')}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *map(": ".join, refusal.headers),
        *(["Connection: close"] if close else []),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body
