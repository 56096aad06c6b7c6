"""The router's front door: the proxied POSTs served by a lean HTTP/1.1 protocol.

aiohttp's server costs the router more CPU per request than everything else
it does: with the same upstream relay behind it, a one-token completion took
~440 µs of CPU at 16 concurrent clients and ~810 µs one at a time through
aiohttp on 2 cores, ~260 and ~460 µs through this protocol (a raw byte relay:
~245 and ~375). On a machine whose cores are busy generating, that CPU is
taken from llama-server.

So each connection starts here. A request that is the common case, a POST to
one of :data:`procman.router.PROXIED` in HTTP/1.1 with a ``Content-Length``
body, no ``Expect`` or ``Transfer-Encoding``, within the body limit and (with
an API key) authorised, is parsed here and answered through
:meth:`procman.router.Router.answer_raw`, its response written straight to the
transport. Anything else (other paths, HTTP/1.0, chunked uploads, a missing
key, a malformed head) hands the connection, bytes read so far included, to
aiohttp's protocol for good, which answers it as it always did: the 401s,
413s and 400s keep their one implementation.

A client that disconnects cancels its request's task, which aborts the
upstream request (as ``handler_cancellation`` does in aiohttp).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from procman.router import Router

__all__ = ["KEEPALIVE", "Front", "Incoming", "close_idle"]

log = logging.getLogger(__name__)

#: aiohttp's own limit for a request head (line and headers)
_MAX_HEAD = 8190
#: bytes of a next (pipelined) request buffered while one is answered
_MAX_AHEAD = 256 * 1024
#: an idle connection is closed after this long, as aiohttp does with its own
KEEPALIVE = 75.0
#: request headers that aiohttp handles (100-continue, chunked uploads, upgrades)
_NOT_OURS = frozenset({"transfer-encoding", "expect", "upgrade"})


@dataclass(frozen=True, slots=True)
class Incoming:
    """A proxied request, whichever front received it."""

    target: str
    """Path and query, as sent."""
    headers: list[tuple[str, str]]
    """The client's headers that go on to llama-server."""
    body: bytes
    http11: bool = True


@dataclass(slots=True)
class _Head:
    target: str
    headers: list[tuple[str, str]]
    length: int
    close: bool
    end: int  # where the body starts in the buffer


class Front(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    def __init__(self, router: Router, fallback: Callable[[], asyncio.Protocol]) -> None:
        self.router = router
        self.fallback = fallback
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.task: asyncio.Task[None] | None = None
        self._head: _Head | None = None
        self._paused = False
        self.last_active = 0.0
        """Loop time of the last byte received or answer sent (see :meth:`idle_for`)."""

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # TCP_NODELAY is already set: uvloop and asyncio set it on every TCP transport
        self.transport = cast("asyncio.Transport", transport)
        self.router.fronts.add(self)
        self.last_active = asyncio.get_running_loop().time()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.last_active = asyncio.get_running_loop().time()
        if self.task is None:
            self._next()
        elif len(self.buffer) > _MAX_AHEAD and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.router.fronts.discard(self)
        if self.task is not None:
            self.task.cancel()  # the client has gone: its upstream request is aborted

    # -- requests -------------------------------------------------------------------------
    def _next(self) -> None:
        """Start the next request in the buffer if it is whole; hand over what is not ours."""
        if self.transport is None or self.transport.is_closing():
            return
        head = self._head
        if head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > _MAX_HEAD:
                    self._hand_over()
                return
            head = self._head = self._parse(end)
            if head is None:
                self._hand_over()
                return
        if len(self.buffer) < head.end + head.length:
            return  # the body is still coming
        body = bytes(self.buffer[head.end : head.end + head.length])
        del self.buffer[: head.end + head.length]
        self._head = None
        incoming = Incoming(target=head.target, headers=head.headers, body=body)
        self.task = asyncio.get_running_loop().create_task(self._serve(incoming, head.close))

    def _parse(self, end: int) -> _Head | None:
        """The head if the request is one this front serves, else None."""
        lines = self.buffer[:end].decode("utf-8", "surrogateescape").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        target, _, version = rest.partition(" ")
        ours = method == "POST" and version == "HTTP/1.1"
        if not ours or target.partition("?")[0] not in self.router.fast_paths:
            return None
        return self._headers(lines[1:], target, end + 4)

    def _headers(self, lines: list[str], target: str, body_at: int) -> _Head | None:
        router = self.router
        headers: list[tuple[str, str]] = []
        length: int | None = None
        close, authorization = False, ""
        for line in lines:
            name, colon, value = line.partition(":")
            value, lowered = value.strip(), name.lower()
            if not colon or not name or name != name.strip() or lowered in _NOT_OURS:
                return None
            if lowered == "content-length":
                if length is not None or not value.isdigit():
                    return None
                length = int(value)
            elif lowered == "connection":
                close = "close" in value.lower()
            elif lowered == "authorization":
                authorization = value
            if lowered not in router.hop_by_hop:
                headers.append((name, value))
        if length is None or length > router.settings.max_body_bytes:
            return None
        if not router.authorised(authorization):  # aiohttp answers the 401
            return None
        return _Head(target=target, headers=headers, length=length, close=close, end=body_at)

    async def _serve(self, incoming: Incoming, close: bool) -> None:
        transport = self.transport
        if transport is None:  # pragma: no cover - _next runs after connection_made
            return
        keep = False
        try:
            keep = await self.router.answer_raw(incoming, transport, close=close)
        except asyncio.CancelledError:
            return  # the client left: connection_lost cancelled us
        except Exception:  # a bug must cost one connection, not the router
            log.exception("request %s failed", incoming.target)
            transport.abort()
            return
        finally:
            self.task = None
            self.last_active = asyncio.get_running_loop().time()
        if not keep or transport.is_closing():
            transport.close()
            return
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if self.buffer:
            self._next()

    def _hand_over(self) -> None:
        """Give the connection, and every byte read from it, to aiohttp's protocol."""
        transport = self.transport
        if transport is None:  # pragma: no cover - _next runs after connection_made
            return
        # from here the protocol is aiohttp's: nothing reaches this object again
        self.router.fronts.discard(self)
        protocol = self.fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        data, self.buffer = bytes(self.buffer), bytearray()
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if data:
            protocol.data_received(data)

    def idle_for(self, now: float) -> float:
        """Seconds without a request in progress or a byte from the client (0 if busy)."""
        return 0.0 if self.task is not None else now - self.last_active

    def close(self) -> None:
        """Close the connection if no request is being answered on it."""
        if self.task is None and self.transport is not None:
            self.transport.close()


async def close_idle(fronts: set[Front], every: float = KEEPALIVE / 5) -> None:
    """Close connections idle for :data:`KEEPALIVE` seconds, until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every)
        now = loop.time()
        for front in [f for f in fronts if f.idle_for(now) > KEEPALIVE]:
            front.close()
