"""Answers passed on as the bytes llama-server wrote, over raw connections.

Through aiohttp's client and server objects every token of a streamed answer
crosses a dozen layers of Python (the parser callback, a StreamReader, a task
wakeup, ``iter_any``, ``StreamResponse.write``, chunk framing, ``drain``):
~200 µs of CPU per token on a 2-core machine, taken from llama-server's own
threads. Both hops speak HTTP/1.1 with chunked bodies, so the body can pass
through unchanged: a :class:`asyncio.Protocol` receives each read from
llama-server and writes it to the client's transport in the same callback.
Only the chunk framing is followed (:class:`ChunkScanner`), to know where the
answer ends: its terminal chunk is left to the writer (:mod:`procman.router._downstream`
passes the answer on to the client, through aiohttp or the front's transport).

A stream goes out on a fresh loopback connection (``Connection: close``).
Other answers (JSON with a ``Content-Length``) go out on a kept-alive
connection from a :class:`Pool` and come back whole in one write when small,
or passed through as they are read when large: this skips aiohttp's client
(~0.3 ms of CPU per request, the connect and llama-server's accept included).
The head of an answer is parsed here (llama-server is our own child; a head
that does not parse is an upstream error).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from procman.process.endpoint import Endpoint

__all__ = [
    "Answer",
    "ChunkScanner",
    "Head",
    "Pool",
    "UpstreamHungUp",
    "kept",
    "open_stream",
]  # fmt: skip

#: a chunk-size line or a response head longer than this is not llama-server's
_MAX_LINE = 1024
_MAX_HEAD = 64 * 1024
#: the client's unsent bytes above which llama-server is no longer read (backpressure)
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
_RESUME_POLL = 0.01
#: answers up to this length are read whole and sent in one write; longer ones pass through
_WHOLE = 256 * 1024
#: a kept-alive connection idle for longer is closed rather than reused: llama-server
#: (cpp-httplib) closes its end after 5 s idle, and a request must never race that
IDLE_REUSE = 2.0


def kept(headers: Iterable[tuple[str, str]], skip: frozenset[str]) -> list[tuple[str, str]]:
    """The headers whose (lowercase) names are not in ``skip``: what is passed on."""
    return [(k, v) for k, v in headers if k.lower() not in skip]


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

    @property
    def between(self) -> bool:
        """At the start of a chunk: the next byte begins a size line."""
        return not self._need and not self._line and not self.done

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
    close: bool = False
    """The server closes the connection after this answer."""

    @classmethod
    def parse(cls, raw: bytes) -> Head:
        """Raises ValueError for a head llama-server would not write."""
        lines = raw.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ValueError(f"bad status line {lines[0][:60]!r}")
        head = cls(status=int(code), reason=reason, headers=[], close=version == "HTTP/1.0")
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
            elif lowered == "connection":
                head.close = value.lower() == "close"
        if head.status in (204, 304) or head.status < 200:  # never a body (RFC 9112 6.3)
            head.chunked, head.length = False, 0
        return head


@dataclass(eq=False)
class Answer(asyncio.Protocol):
    """A connection to llama-server and the answer it is reading (one at a time)."""

    loop: asyncio.AbstractEventLoop
    #: the pool it goes back to after a complete answer (None: closed after one)
    pool: Pool | None = None
    #: the server's ``Endpoint.pool_key``
    key: tuple[str, int] = ("", 0)
    head: asyncio.Future[Head] = field(init=False)
    #: resolves when the whole answer has been passed on (or read, if kept whole)
    done: asyncio.Future[None] = field(init=False)
    transport: asyncio.Transport | None = None
    #: the client's transport, once the client has been sent the head
    sink: asyncio.Transport | None = None
    #: the sink, while a chunked body is between chunks (see :meth:`data_received`)
    _through: asyncio.Transport | None = None
    pending: list[bytes] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    #: the body is kept and answered in one piece (see :func:`relay`)
    whole: bool = True
    #: the connection may carry another request once this answer is complete
    reusable: bool = False
    idle_since: float = 0.0
    _raw_head: bytearray = field(default_factory=bytearray)
    _scanner: ChunkScanner = field(default_factory=ChunkScanner)
    _left: int = 0  # body bytes still to come, when the length is known
    _paused: bool = False
    _lost: bool = False

    def __post_init__(self) -> None:
        self.head = self.loop.create_future()
        self.done = self.loop.create_future()

    def begin(self) -> None:
        """Ready a kept-alive connection for its next request."""
        self.__post_init__()
        self.sink, self._through, self.pending, self.body = None, None, [], bytearray()
        self.whole, self.reusable, self._paused = True, False, False
        self._raw_head.clear()
        self._scanner = ChunkScanner()

    @property
    def alive(self) -> bool:
        return not self._lost and self.transport is not None and not self.transport.is_closing()

    @property
    def at_chunk_boundary(self) -> bool:
        """Everything read has been passed on and ends between two chunks: the client's
        stream can take one more chunk of ours."""
        return self._scanner.between and not self.pending

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        through = self._through
        if through is not None:
            # the usual read of a stream: one whole chunk that is not the last, as
            # llama-server sends each event. Passed on here, without the layers of the
            # general path: on a machine whose cores are busy generating, each token's
            # wake-up runs with cold caches, and those layers took ~18 µs of the router's
            # ~165 µs of CPU per streamed token. Anything else takes the general path.
            end = data.find(b"\r\n", 0, 18)  # a size line: up to 16 hex digits
            digits = data[:end] if end > 0 else b""
            try:
                size = int(digits, 16) if digits.isalnum() else 0
            except ValueError:
                size = 0
            whole = size and len(data) == end + size + 4 and data.endswith(b"\r\n")
            if whole and not through.is_closing():
                through.write(data)
                if through.get_write_buffer_size() > _HIGH_WATER:
                    self._pause()
                return
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
        self.whole = not head.chunked and (head.length is None or head.length <= _WHOLE)
        self._left = head.length or 0
        self.head.set_result(head)
        if rest:
            self._body(rest)
        elif head.length == 0:
            self._finish()

    def _body(self, data: bytes) -> None:
        if self.done.done():  # bytes nobody asked for: this connection cannot be trusted
            self._fail(ValueError("llama-server sent more than its answer"))
            return
        head = self.head.result()
        if head.chunked:
            try:
                out = self._scanner.feed(data)
            except ValueError as exc:
                self._fail(exc)
                return
            if out:
                self.write(out)
            if self._scanner.done:
                self._finish()
            else:
                self._quick()
            return
        if head.length is None:  # until llama-server closes the connection
            self.body += data
            return
        if len(data) > self._left:
            self._fail(ValueError("llama-server sent more than its Content-Length"))
            return
        self._left -= len(data)
        if self.whole:
            self.body += data
        else:
            self.write(data)
        if not self._left:
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
        if sink.get_write_buffer_size() > _HIGH_WATER:
            self._pause()

    def _pause(self) -> None:
        """Stop reading llama-server until the client has taken most of what it was sent."""
        if self._paused:
            return
        self._paused, self._through = True, None
        if self.transport is not None:
            self.transport.pause_reading()
        self.loop.call_later(_RESUME_POLL, self._maybe_resume)

    def attach(self, sink: asyncio.Transport) -> None:
        """Start passing the body to the client (what arrived meanwhile first)."""
        self.sink = sink
        pending, self.pending = self.pending, []
        for data in pending:
            self.write(data)
        self._quick()

    def _quick(self) -> None:
        """Let :meth:`data_received` pass whole chunks straight on while it safely can:
        the client has the head, the body is chunked and between chunks, nothing paused."""
        sink, head = self.sink, self.head
        chunked = head.done() and not head.cancelled() and not head.exception()
        chunked = chunked and head.result().chunked
        ok = chunked and self._scanner.between and not self._paused and not self.done.done()
        self._through = sink if ok else None

    def _maybe_resume(self) -> None:
        if self.done.done() or self.sink is None:
            return
        if self.sink.is_closing():
            self._fail(ConnectionResetError("the client has gone"))
        elif self.sink.get_write_buffer_size() <= _LOW_WATER:
            self._paused = False
            self._quick()
            if self.transport is not None:
                self.transport.resume_reading()
        else:
            self.loop.call_later(_RESUME_POLL, self._maybe_resume)

    def _finish(self) -> None:
        self._through = None
        if not self.done.done():
            self.done.set_result(None)
        head = self.head.result()
        # a chunked answer may still have its trailers' last CRLF to come: not reused
        self.reusable = self.pool is not None and not head.close and not head.chunked
        if not self.reusable and self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        self.reusable, self._through = False, None
        for future in (self.head, self.done):
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost, self.reusable, self._through = True, False, None
        if self.pool is not None:
            self.pool.discard(self)
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

    def release(self) -> None:
        """After the answer: back to the pool if complete and reusable, else closed."""
        complete = self.done.done() and not self.done.cancelled() and not self.done.exception()
        if self.pool is not None and complete and self.reusable and self.alive:
            self.pool.put(self)
        else:
            self.close()


class Pool:
    """Kept-alive connections to llama-servers, by endpoint, the latest used first.

    Reusing the most recently used connection keeps as few open as the
    concurrency needs: each one holds a llama-server HTTP thread while idle
    (see ``ServerSpec.pipeline``). Connections that llama-server closes leave
    the pool at once; those idle for more than :data:`IDLE_REUSE` are closed
    instead of reused.
    """

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[Answer]] = {}

    def take(self, key: tuple[str, int], now: float) -> Answer | None:
        idle = self._idle.get(key)
        while idle:
            answer = idle.pop()
            if answer.alive and now - answer.idle_since <= IDLE_REUSE:
                answer.begin()
                return answer
            answer.close()
        return None

    def put(self, answer: Answer) -> None:
        answer.idle_since = answer.loop.time()
        self._idle.setdefault(answer.key, []).append(answer)

    def discard(self, answer: Answer) -> None:
        idle = self._idle.get(answer.key)
        if idle and answer in idle:
            idle.remove(answer)
        if not idle:
            self._idle.pop(answer.key, None)

    def __len__(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> None:
        idle = [answer for each in self._idle.values() for answer in each]
        self._idle.clear()
        for answer in idle:
            answer.close()


async def open_stream(
    endpoint: Endpoint,
    method: str,
    path: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    *,
    connect_timeout: float,
    pool: Pool | None = None,
) -> Answer:
    """Send the request to the llama-server at ``endpoint``; returns once the head of its
    answer is in. With a ``pool``, on a kept-alive connection from it (a new one if none is
    idle); without, on a new one closed after the answer. Raises OSError
    (ConnectionRefusedError/FileNotFoundError: nothing listens; :class:`UpstreamHungUp`:
    closed before answering) or ValueError (a malformed head).
    """
    key = endpoint.pool_key
    loop = asyncio.get_running_loop()
    answer = pool.take(key, loop.time()) if pool is not None else None
    if answer is None:
        answer = Answer(loop, pool=pool, key=key)
        await asyncio.wait_for(endpoint.connect(lambda: answer), connect_timeout)
    host = "localhost" if endpoint.socket is not None else f"{key[0]}:{key[1]}"
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"Content-Length: {len(body)}"] if body or method != "GET" else []
    lines += ["Accept-Encoding: identity"] + ([] if pool is not None else ["Connection: close"])
    lines += [f"{name}: {value}" for name, value in (*headers, *endpoint.auth())]
    if answer.transport is None:  # pragma: no cover - the connect made it
        raise UpstreamHungUp("no connection")
    # the front decoded the client's header bytes as UTF-8 with surrogateescape: the same
    # bytes go on
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    answer.transport.write(head + body)
    try:
        await answer.head
    except BaseException:
        answer.close()
        raise
    return answer
