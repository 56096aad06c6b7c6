"""procman.router._upstream's parts: chunk framing, the answer's head, backpressure (no sockets)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from procman.router import _upstream
from procman.router._upstream import Answer, ChunkScanner, Head, Pool

EVENTS = [b'data: {"n": 1}\n\n', b'data: {"n": 22}\n\n' * 20, b"data: [DONE]\n\n"]


def chunked(*pieces: bytes, ext: bytes = b"") -> bytes:
    return b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in pieces) + b"0\r\n\r\n"


def scan(wire: bytes, cuts: list[int]) -> tuple[bytes, bool]:
    scanner, out, last = ChunkScanner(), [], 0
    for cut in [*cuts, len(wire)]:
        out.append(scanner.feed(wire[last:cut]))
        last = cut
    return b"".join(out), scanner.done


def test_one_chunk_per_read_passes_through_uncopied() -> None:
    scanner = ChunkScanner()
    read = b"11\r\n" + EVENTS[0] + b"\r\n"
    assert scanner.feed(read) is read
    assert not scanner.done


@pytest.mark.parametrize("ext", [b"", b";name=value"])
def test_every_split_gives_the_body_up_to_the_terminal_chunk(ext: bytes) -> None:
    wire = chunked(*EVENTS, ext=ext)
    body = wire[: -len(b"0\r\n\r\n")]
    for cut in range(len(wire) + 1):
        assert scan(wire, [cut]) == (body, True), cut
    for a in range(0, len(wire), 7):  # two cuts: pieces inside size lines and CRLFs
        for b in range(a, len(wire), 5):
            assert scan(wire, [a, b]) == (body, True), (a, b)
    assert scan(wire, list(range(1, len(wire)))) == (body, True)  # a byte at a time


def test_nothing_after_the_terminal_chunk_is_passed_on() -> None:
    scanner = ChunkScanner()
    assert scanner.feed(b"3\r\nabc\r\n0\r\n\r\nextra") == b"3\r\nabc\r\n"
    assert scanner.done
    assert scanner.feed(b"more") == b""


@pytest.mark.parametrize("bad", [b"zz\r\n", b"-1\r\n", b"1_0\r\n", b"\r\n", b"x" * 2000])
def test_framing_llama_server_would_not_write_is_refused(bad: bytes) -> None:
    with pytest.raises(ValueError):
        ChunkScanner().feed(bad)


def test_a_head_is_parsed() -> None:
    head = Head.parse(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\nX-Odd:  spaced  "
    )
    assert (head.status, head.reason, head.chunked, head.length) == (200, "OK", True, None)
    assert head.headers[-1] == ("X-Odd", "spaced")
    error = Head.parse(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 52")
    assert (error.status, error.chunked, error.length, error.close) == (400, False, 52, False)
    assert Head.parse(b"HTTP/1.1 200 OK\r\nConnection: Close").close
    assert Head.parse(b"HTTP/1.0 200 OK").close
    assert Head.parse(b"HTTP/1.1 204 No Content").length == 0  # ends here, kept alive or not


@pytest.mark.parametrize(
    "raw",
    [b"SPDY 200 OK", b"HTTP/1.1 abc", b"HTTP/1.1 200 OK\r\nno colon", b"HTTP/1.1 200\r\n x: y"],
)
def test_a_head_that_does_not_parse_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        Head.parse(raw)


class FakeTransport:
    """A transport that records what the relay does with it."""

    def __init__(self, buffered: int = 0) -> None:
        self.written: list[bytes] = []
        self.buffered = buffered
        self.paused = False
        self.closing = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closing = True


def answer_with_head() -> tuple[Answer, FakeTransport]:
    answer = Answer(asyncio.get_running_loop())
    upstream = FakeTransport()
    answer.connection_made(upstream)  # type: ignore[arg-type]
    answer.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    return answer, upstream


async def test_the_body_waits_for_the_client_then_flows() -> None:
    answer, _ = answer_with_head()
    client = FakeTransport()
    answer.attach(client)  # type: ignore[arg-type]
    answer.data_received(b"2\r\nde\r\n0\r\n\r\n")
    assert client.written == [b"3\r\nabc\r\n", b"2\r\nde\r\n"]
    assert answer.done.done()


async def test_a_slow_client_pauses_llama_server_until_it_drains() -> None:
    answer, upstream = answer_with_head()
    client = FakeTransport(buffered=1 << 20)
    answer.attach(client)  # type: ignore[arg-type]
    assert upstream.paused
    await asyncio.sleep(0.03)
    assert upstream.paused  # still full
    client.buffered = 0
    await asyncio.sleep(0.03)
    assert not upstream.paused


async def test_a_client_gone_aborts_the_upstream_connection() -> None:
    answer, upstream = answer_with_head()
    client = FakeTransport()
    client.closing = True
    answer.attach(client)  # type: ignore[arg-type]
    assert upstream.aborted  # llama-server sees the socket go and frees the slot
    with pytest.raises(ConnectionResetError):
        await answer.done


def counting_general_path(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The reads that take the general path (:meth:`Answer._body`), recorded."""
    seen: list[bytes] = []
    general = Answer._body

    def body(self: Answer, data: bytes) -> None:
        seen.append(data)
        general(self, data)

    monkeypatch.setattr(Answer, "_body", body)
    return seen


async def test_a_read_of_one_whole_chunk_goes_straight_to_the_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answer, _ = answer_with_head()
    client = FakeTransport()
    answer.attach(client)  # type: ignore[arg-type]
    general = counting_general_path(monkeypatch)
    # a payload that looks like framing is still one chunk's data
    reads = [b"5\r\nhello\r\n", b"3\r\n0\r\n\r\n", b"%x\r\n%s\r\n" % (300, b"x" * 300)]
    for data in reads:
        answer.data_received(data)
    assert client.written == [b"3\r\nabc\r\n", *reads]
    assert general == []
    answer.data_received(b"0\r\n\r\n")  # the terminal chunk: aiohttp writes its own
    assert general == [b"0\r\n\r\n"]
    assert answer.done.done()
    assert len(client.written) == 1 + len(reads)


@pytest.mark.parametrize("cut", [1, 2, 4, 7, 11, 12, 16])
async def test_reads_cut_anywhere_pass_the_same_bytes(cut: int) -> None:
    """The quick path and the general one take turns as reads fall on or off chunk edges."""
    answer, _ = answer_with_head()
    client = FakeTransport()
    answer.attach(client)  # type: ignore[arg-type]
    wire = chunked(*EVENTS, b"tail")
    edges = [8, 8 + cut, 8 + 2 * cut, len(wire) - 20, len(wire) - 5, len(wire)]
    reads = [wire[:8]] + [wire[a:b] for a, b in itertools.pairwise(edges) if a < b]
    for data in reads:
        answer.data_received(data)
    assert b"".join(client.written) == b"3\r\nabc\r\n" + wire[:-5]
    assert answer.done.done()
    assert answer.done.exception() is None


async def test_a_slow_client_stops_the_quick_path_too() -> None:
    answer, upstream = answer_with_head()
    client = FakeTransport()
    answer.attach(client)  # type: ignore[arg-type]
    client.buffered = 1 << 20
    answer.data_received(b"2\r\nde\r\n")
    assert upstream.paused
    client.buffered = 0
    await asyncio.sleep(0.03)
    assert not upstream.paused
    answer.data_received(b"2\r\nfg\r\n")
    assert client.written[-2:] == [b"2\r\nde\r\n", b"2\r\nfg\r\n"]


async def test_a_client_gone_mid_stream_aborts_the_upstream_connection() -> None:
    answer, upstream = answer_with_head()
    client = FakeTransport()
    answer.attach(client)  # type: ignore[arg-type]
    answer.data_received(b"2\r\nde\r\n")
    client.closing = True
    answer.data_received(b"2\r\nfg\r\n")
    assert upstream.aborted
    assert client.written == [b"3\r\nabc\r\n", b"2\r\nde\r\n"]
    with pytest.raises(ConnectionResetError):
        await answer.done


async def test_llama_server_breaking_off_is_an_error_not_an_end() -> None:
    answer, _ = answer_with_head()
    answer.attach(FakeTransport())  # type: ignore[arg-type]
    answer.connection_lost(None)
    with pytest.raises(ConnectionResetError):
        await answer.done


def pooled(pool: Pool, key: tuple[str, int] = ("127.0.0.1", 1)) -> tuple[Answer, FakeTransport]:
    answer = Answer(asyncio.get_running_loop(), pool=pool, key=key)
    upstream = FakeTransport()
    answer.connection_made(upstream)  # type: ignore[arg-type]
    return answer, upstream


JSON_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


async def test_a_complete_answer_goes_back_to_the_pool_open() -> None:
    pool = Pool()
    answer, upstream = pooled(pool)
    answer.data_received(JSON_ANSWER[:-1])
    assert not answer.done.done()
    answer.data_received(JSON_ANSWER[-1:])
    assert answer.done.done() and answer.whole and bytes(answer.body) == b"{}"
    answer.release()
    assert not upstream.closing and len(pool) == 1
    again = pool.take(answer.key, answer.loop.time())
    assert again is answer and not again.head.done() and not again.body  # ready for the next


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",  # says so
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    ],
)
async def test_an_answer_that_ends_its_connection_is_not_pooled(wire: bytes) -> None:
    pool = Pool()
    answer, upstream = pooled(pool)
    answer.attach(FakeTransport())  # type: ignore[arg-type]
    answer.data_received(wire)
    assert answer.done.done() and not answer.reusable
    answer.release()
    assert upstream.closing and len(pool) == 0


async def test_unfinished_answers_and_stray_bytes_close_the_connection() -> None:
    pool = Pool()
    cut, upstream = pooled(pool)
    cut.data_received(JSON_ANSWER[:-1])
    cut.release()  # the client left mid-answer: llama-server must see the connection go
    assert upstream.aborted and len(pool) == 0
    stray, upstream = pooled(pool)
    stray.data_received(JSON_ANSWER + b"x")
    assert upstream.aborted
    with pytest.raises(ValueError, match="more than its Content-Length"):
        await stray.done


async def test_the_pool_hands_out_the_latest_live_connection_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = Pool()
    loop = asyncio.get_running_loop()
    old, _ = pooled(pool)
    dead, _ = pooled(pool)
    new, _ = pooled(pool)
    for answer in (old, dead, new):
        answer.data_received(JSON_ANSWER)
        answer.release()
    dead.connection_lost(None)  # llama-server closed it: it leaves the pool at once
    assert len(pool) == 2
    assert pool.take(old.key, loop.time()) is new
    assert pool.take(old.key, loop.time()) is old
    assert pool.take(old.key, loop.time()) is None
    old.data_received(JSON_ANSWER)
    old.release()
    monkeypatch.setattr(_upstream, "IDLE_REUSE", 0.0)
    await asyncio.sleep(0.01)
    assert pool.take(old.key, loop.time()) is None  # idle too long: closed, not reused
    assert old.transport is not None and old.transport.is_closing()
