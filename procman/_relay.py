"""Streamed answers passed on as the bytes llama-server wrote (requests with ``"stream": true``).

Through aiohttp's client and server objects every token of a streamed answer
crosses a dozen layers of Python (the parser callback, a StreamReader, a task
wakeup, ``iter_any``, ``StreamResponse.write``, chunk framing, ``drain``):
~200 µs of CPU per token on a 2-core machine, taken from llama-server's own
threads. Both hops speak HTTP/1.1 with chunked bodies, so the body can pass
through unchanged: a :class:`asyncio.Protocol` receives each read from
llama-server and writes it to the client's transport in the same callback.
Only the chunk framing is followed (:class:`ChunkScanner`), to know where the
answer ends: its terminal chunk is left to aiohttp's ``write_eof``.

The request goes out on a fresh loopback connection (``Connection: close``);
the head of the answer is parsed here (llama-server is our own child; a head
that does not parse is an upstream error). An answer that is not chunked (an
error with a ``Content-Length``) is read whole and returned as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from aiohttp import web

__all__ = ["ChunkScanner", "Head", "UpstreamHungUp", "open_stream", "relay"]

#: a chunk-size line or a response head longer than this is not llama-server's
_MAX_LINE = 1024
_MAX_HEAD = 64 * 1024
#: the client's unsent bytes above which llama-server is no longer read (backpressure)
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
_RESUME_POLL = 0.01


class UpstreamHungUp(ConnectionError):
    """The connection ended before the head of an answer: nothing was answered."""


class ChunkScanner:
    """Follows HTTP/1.1 chunk framing across reads and stops at the terminal chunk.

    :meth:`feed` returns the bytes to pass on: everything up to the terminal
    chunk, which is withheld (the client gets aiohttp's own), as is a size
    line cut by the end of a read until it is complete (it may be the
    terminal one). In the usual case, one whole chunk per read, it returns
    the read itself, uncopied.
    """

    def __init__(self) -> None:
        self._need = 0  # chunk data and its CRLF still to pass before the next size line
        self._line = b""  # a size line begun in an earlier read
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """Raises ValueError for framing llama-server would not write."""
        if self.done:
            return b""
        prefix, pos, n = b"", 0, len(data)
        if self._line:
            end = data.find(b"\n")
            if end < 0:
                self._line += data
                if len(self._line) > _MAX_LINE:
                    raise ValueError("chunk size line too long")
                return b""
            prefix, self._line = self._line, b""
            if self._start_chunk(prefix + data[: end + 1]):
                return b""
            pos = end + 1
        while pos < n:
            if self._need:
                step = min(self._need, n - pos)
                pos += step
                self._need -= step
                continue
            end = data.find(b"\n", pos)
            if end < 0:
                self._line = data[pos:]
                if len(self._line) > _MAX_LINE:
                    raise ValueError("chunk size line too long")
                return prefix + data[:pos]
            if self._start_chunk(data[pos : end + 1]):
                return prefix + data[:pos]
            pos = end + 1
        return prefix + data if prefix else data

    def _start_chunk(self, line: bytes) -> bool:
        """Take one size line; True if it is the terminal chunk."""
        if len(line) > _MAX_LINE:
            raise ValueError("chunk size line too long")
        digits = line.split(b";", 1)[0].strip()
        if not digits.isalnum():  # int() would take "_" or "+"; hex letters it checks itself
            raise ValueError(f"bad chunk size line {line[:40]!r}")
        size = int(digits, 16)
        if size == 0:
            self.done = True
            return True
        self._need = size + 2  # the data and its CRLF
        return False


@dataclass
class Head:
    """The status line and headers of an answer."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    chunked: bool = False
    length: int | None = None

    @classmethod
    def parse(cls, raw: bytes) -> Head:
        """Raises ValueError for a head llama-server would not write."""
        lines = raw.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ValueError(f"bad status line {lines[0][:60]!r}")
        head = cls(status=int(code), reason=reason, headers=[])
        for line in lines[1:]:
            if not line:
                continue
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise ValueError(f"bad header line {line[:60]!r}")
            value = value.strip()
            head.headers.append((name, value))
            lowered = name.lower()
            if lowered == "transfer-encoding":
                head.chunked = value.lower() == "chunked"
            elif lowered == "content-length":
                head.length = int(value)
        return head


@dataclass(eq=False)
class _Answer(asyncio.Protocol):
    """One request's connection to llama-server."""

    loop: asyncio.AbstractEventLoop
    head: asyncio.Future[Head] = field(init=False)
    #: resolves when the whole answer has been passed on (or read, if not chunked)
    done: asyncio.Future[None] = field(init=False)
    transport: asyncio.Transport | None = None
    #: the client's transport, once the client has been sent the head
    sink: asyncio.Transport | None = None
    pending: list[bytes] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    _raw_head: bytearray = field(default_factory=bytearray)
    _scanner: ChunkScanner = field(default_factory=ChunkScanner)
    _paused: bool = False

    def __post_init__(self) -> None:
        self.head = self.loop.create_future()
        self.done = self.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        if self.head.done():
            self._body(data)
            return
        self._raw_head += data
        end = self._raw_head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._raw_head) > _MAX_HEAD:
                self._fail(ValueError("answer head too long"))
            return
        try:
            head = Head.parse(bytes(self._raw_head[:end]))
        except ValueError as exc:
            self._fail(exc)
            return
        rest = bytes(self._raw_head[end + 4 :])
        self._raw_head.clear()
        self.head.set_result(head)
        if rest:
            self._body(rest)
        elif head.length == 0:
            self._finish()

    def _body(self, data: bytes) -> None:
        if self.done.done():
            return
        head = self.head.result()
        if not head.chunked:  # read whole: errors and other short answers
            self.body += data
            if head.length is not None and len(self.body) >= head.length:
                del self.body[head.length :]
                self._finish()
            return
        try:
            out = self._scanner.feed(data)
        except ValueError as exc:
            self._fail(exc)
            return
        if out:
            self.write(out)
        if self._scanner.done:
            self._finish()

    def write(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            self.pending.append(data)
            return
        if sink.is_closing():  # the client has gone: stop generating for it
            self._fail(ConnectionResetError("the client has gone"))
            return
        sink.write(data)
        if sink.get_write_buffer_size() > _HIGH_WATER and not self._paused:
            self._paused = True
            if self.transport is not None:
                self.transport.pause_reading()
            self.loop.call_later(_RESUME_POLL, self._maybe_resume)

    def attach(self, sink: asyncio.Transport) -> None:
        """Start passing the body to the client (what arrived meanwhile first)."""
        self.sink = sink
        pending, self.pending = self.pending, []
        for data in pending:
            self.write(data)

    def _maybe_resume(self) -> None:
        if self.done.done() or self.sink is None:
            return
        if self.sink.is_closing():
            self._fail(ConnectionResetError("the client has gone"))
        elif self.sink.get_write_buffer_size() <= _LOW_WATER:
            self._paused = False
            if self.transport is not None:
                self.transport.resume_reading()
        else:
            self.loop.call_later(_RESUME_POLL, self._maybe_resume)

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        for future in (self.head, self.done):
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(UpstreamHungUp("llama-server closed before answering"))
        elif not self.done.done():
            head = self.head.result()
            if head.chunked or head.length is not None:
                self.done.set_exception(ConnectionResetError("llama-server broke off its answer"))
            else:
                self.done.set_result(None)  # read until the end: this was the end
        for future in (self.head, self.done):  # retrieved: a gone caller never awaits them
            if future.done() and not future.cancelled():
                future.exception()

    def close(self) -> None:
        if self.transport is not None and not self.done.done():
            self.transport.abort()  # unfinished: llama-server sees it and frees the slot
        elif self.transport is not None:
            self.transport.close()


async def open_stream(
    base: str,
    path: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    *,
    connect_timeout: float,
) -> _Answer:
    """Send the request to llama-server at ``base`` (``http://host:port``); returns once the
    head of its answer is in. Raises OSError (ConnectionRefusedError: nothing listens;
    :class:`UpstreamHungUp`: closed before answering) or ValueError (a malformed head).
    """
    host, _, port = base.removeprefix("http://").rpartition(":")
    loop = asyncio.get_running_loop()
    answer = _Answer(loop)
    await asyncio.wait_for(
        loop.create_connection(lambda: answer, host.strip("[]"), int(port)), connect_timeout
    )
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += ["Connection: close", "Accept-Encoding: identity"]
    lines += [f"{name}: {value}" for name, value in headers]
    if answer.transport is None:  # pragma: no cover - create_connection made it
        raise UpstreamHungUp("no connection")
    # aiohttp decoded the client's header bytes as UTF-8 with surrogateescape: the same bytes go on
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    answer.transport.write(head + body)
    try:
        await answer.head
    except BaseException:
        answer.close()
        raise
    return answer


async def relay(request: web.Request, answer: _Answer, skip: frozenset[str]) -> web.StreamResponse:
    """Answer ``request`` with what llama-server answers; headers named in ``skip`` stay back."""
    head = answer.head.result()
    headers = [(k, v) for k, v in head.headers if k.lower() not in skip]
    try:
        if not head.chunked:
            await answer.done
            return web.Response(
                status=head.status,
                reason=head.reason,
                body=bytes(answer.body),
                headers=headers,  # so its Content-Type, not a default one
            )
        stream = web.StreamResponse(status=head.status, reason=head.reason)
        for key, value in headers:
            stream.headers.add(key, value)
        stream.enable_chunked_encoding()
        await stream.prepare(request)  # the head goes out now (not buffered: a StreamResponse)
        # from here on the head is out: an error cuts the connection rather than end
        # the body cleanly as if complete (llama-server died mid-answer, bad framing,
        # or the client left)
        if request.transport is None:
            return stream
        answer.attach(request.transport)
        try:
            await answer.done
            await stream.write_eof()
        except (ConnectionError, ValueError):
            with contextlib.suppress(Exception):
                request.transport.abort()
        return stream
    finally:
        answer.close()
