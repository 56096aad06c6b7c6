"""The router's lean front (procman._front) over raw sockets: what it serves itself,
what it hands to aiohttp, and that a connection survives both.

Responses from the lean front carry no ``Server`` header (llama-server's is not
passed on); aiohttp's carry its own: that is how these tests tell the paths
apart.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from procman.router import Router
from tests.unit.test_router_unit import FakeFleet, Upstream, ready, serve, upstream

__all__ = ["upstream"]  # the fixture, used here by name

Reply = tuple[str, dict[str, str], bytes]


def post(body: dict[str, object], *extra: str, path: str = "/v1/chat/completions") -> bytes:
    data = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(data)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    """One response: status line, headers, and its body (length or chunked, de-chunked)."""
    status = (await reader.readline()).decode().strip()
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int((await reader.readline()).strip(), 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readexactly(2)  # the terminal chunk's CRLF
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


@pytest.fixture
async def router(upstream: tuple[Upstream, str]) -> AsyncIterator[tuple[Router, str]]:
    _, url = upstream
    fleet = FakeFleet(ready("demo", url), ready("other", url))  # two: an unknown name is a 404
    router, base = await serve(fleet, api_key="k", max_body_bytes=4096)
    yield router, base
    await router.stop()


async def connect(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = base.removeprefix("http://").rpartition(":")
    return await asyncio.open_connection(host, int(port))


KEY = "Authorization: Bearer k"


async def test_one_connection_takes_fast_requests_errors_and_then_aiohttp(
    router: tuple[Router, str],
) -> None:
    reader, writer = await connect(router[1])
    for n in range(2):  # kept alive across fast-path answers
        writer.write(post({"model": "demo", "n": n}, KEY))
        status, headers, body = await read_reply(reader)
        assert status == "HTTP/1.1 200 OK" and "server" not in headers
        assert json.loads(body)["echo"]["n"] == n
    writer.write(post({"model": "nosuch"}, KEY))  # the router's own error, on the fast path
    status, headers, body = await read_reply(reader)
    assert status == "HTTP/1.1 404 Not Found" and "server" not in headers
    assert json.loads(body)["error"]["code"] == "model_not_found"
    assert headers["content-type"].startswith("application/json")
    writer.write(f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{KEY}\r\n\r\n".encode())
    status, headers, body = await read_reply(reader)  # the same connection, now aiohttp's
    assert status == "HTTP/1.1 200 OK" and "aiohttp" in headers["server"]
    assert json.loads(body)["data"][0]["id"] == "demo"
    writer.close()


async def test_pipelined_requests_are_answered_in_order(router: tuple[Router, str]) -> None:
    reader, writer = await connect(router[1])
    writer.write(b"".join(post({"model": "demo", "n": n}, KEY) for n in range(3)))
    replies = [await read_reply(reader) for _ in range(3)]
    assert [json.loads(body)["echo"]["n"] for _, _, body in replies] == [0, 1, 2]
    writer.close()


async def test_a_stream_is_framed_and_the_connection_reused(
    router: tuple[Router, str], upstream: tuple[Upstream, str]
) -> None:
    seen, _ = upstream
    seen.release.set()  # "hold" sends both chunks at once
    reader, writer = await connect(router[1])
    writer.write(post({"model": "demo", "stream": True, "mode": "hold"}, KEY))
    status, headers, body = await read_reply(reader)
    assert status == "HTTP/1.1 200 OK" and headers["transfer-encoding"] == "chunked"
    assert body == b'data: {"n": 1}\n\ndata: {"n": 2}\n\ndata: [DONE]\n\n'
    writer.write(post({"model": "demo", "n": 7}, KEY))
    assert json.loads((await read_reply(reader))[2])["echo"]["n"] == 7
    writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        # HTTP/1.0: aiohttp answers (and re-frames streams for it)
        (post({"model": "demo"}, KEY).replace(b"HTTP/1.1", b"HTTP/1.0"), "HTTP/1.0 200 OK"),
        # no key, or a wrong one: aiohttp's 401, the one implementation of it
        (post({"model": "demo"}), "HTTP/1.1 401 Unauthorized"),
        (post({"model": "demo"}, "Authorization: Bearer nope"), "HTTP/1.1 401 Unauthorized"),
        # over max_body_bytes: aiohttp's 413
        (post({"model": "demo", "pad": "x" * 5000}, KEY), "HTTP/1.1 413 Request Entity Too Large"),
        # a chunked upload
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            + KEY.encode() + b'\r\n\r\n11\r\n{"model": "demo"}\r\n0\r\n\r\n',
            "HTTP/1.1 200 OK",
        ),
        # a malformed header line
        (post({"model": "demo"}, KEY, "no colon here"), "400 Bad Request"),
    ],
)  # fmt: skip
async def test_what_the_front_does_not_serve_aiohttp_does(
    router: tuple[Router, str], request_bytes: bytes, status: str
) -> None:
    reader, writer = await connect(router[1])
    writer.write(request_bytes)
    got, headers, _ = await read_reply(reader)
    assert got.endswith(status) and "aiohttp" in headers.get("server", ""), (got, headers)
    writer.close()


async def test_expect_100_continue_is_honoured(router: tuple[Router, str]) -> None:
    reader, writer = await connect(router[1])
    head, _, body = post({"model": "demo", "n": 5}, KEY, "Expect: 100-continue").partition(
        b"\r\n\r\n"
    )
    writer.write(head + b"\r\n\r\n")
    assert (await reader.readline()).startswith(b"HTTP/1.1 100")
    assert await reader.readline() == b"\r\n"
    writer.write(body)
    status, _, answer = await read_reply(reader)
    assert status == "HTTP/1.1 200 OK" and json.loads(answer)["echo"]["n"] == 5
    writer.close()


async def test_connection_close_is_answered_then_closed(router: tuple[Router, str]) -> None:
    reader, writer = await connect(router[1])
    writer.write(post({"model": "demo"}, KEY, "Connection: close"))
    status, headers, _ = await read_reply(reader)
    assert status == "HTTP/1.1 200 OK" and headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the router
    writer.close()


async def test_a_body_arriving_in_pieces_is_waited_for(router: tuple[Router, str]) -> None:
    reader, writer = await connect(router[1])
    data = post({"model": "demo", "n": 9}, KEY)
    for i in range(0, len(data), 7):
        writer.write(data[i : i + 7])
        await writer.drain()
        await asyncio.sleep(0.001)
    status, headers, body = await read_reply(reader)
    assert status == "HTTP/1.1 200 OK" and "server" not in headers
    assert json.loads(body)["echo"]["n"] == 9
    writer.close()


async def test_stop_waits_for_a_request_in_flight(
    router: tuple[Router, str], upstream: tuple[Upstream, str]
) -> None:
    seen, _ = upstream
    reader, writer = await connect(router[1])
    writer.write(post({"model": "demo", "stream": True, "mode": "hold"}, KEY))
    status = await reader.readline()
    assert status.startswith(b"HTTP/1.1 200")
    stopping = asyncio.create_task(router[0].stop())
    await asyncio.sleep(0.1)
    assert not stopping.done(), "stop() must give the stream its shutdown timeout"
    seen.release.set()
    rest = await asyncio.wait_for(reader.read(), 5)
    assert rest.endswith(b"0\r\n\r\n") and b"[DONE]" in rest
    await asyncio.wait_for(stopping, 5)
    writer.close()


async def test_idle_connections_are_closed_after_the_keepalive(
    router: tuple[Router, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from procman import _front

    reader, writer = await connect(router[1])
    writer.write(post({"model": "demo"}, KEY))
    await read_reply(reader)
    busy_reader, busy_writer = await connect(router[1])
    busy_writer.write(post({"model": "demo", "stream": True, "mode": "hold"}, KEY))
    assert (await busy_reader.readline()).startswith(b"HTTP/1.1 200")
    monkeypatch.setattr(_front, "KEEPALIVE", 0.05)
    sweep = asyncio.create_task(_front.close_idle(router[0].fronts, every=0.02))
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the idle one is closed
        assert len(router[0].fronts) == 1, "the one answering a stream stays"
    finally:
        sweep.cancel()
    busy_writer.close()
    writer.close()
