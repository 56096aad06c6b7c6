"""The router's front (procman.router._front) over raw sockets: what it serves itself, what it
refuses, what it hands to aiohttp, and that a connection survives what it should.

Answers from the fast path carry no ``Server`` header (llama-server's is not passed
on) and neither do the front's own refusals; aiohttp's carry its own: that is how
these tests tell the paths apart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator

import pytest

from procman.router import Router
from tests.unit.test_router_unit import FakeFleet, Upstream, ready, serve, upstream

__all__ = ["upstream"]  # the fixture, used here by name

Reply = tuple[str, dict[str, str], bytes]
HOST = "Host: 127.0.0.1"
KEY = "Authorization: Bearer k"


def post(
    body: dict[str, object], *extra: str, path: str = "/v1/chat/completions", host: str = HOST
) -> bytes:
    data = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", host, f"Content-Length: {len(data)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def get(path: str, *extra: str, host: str = HOST) -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", host, *extra]) + "\r\n\r\n").encode()


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
    router, base = await serve(
        fleet, api_key="k", max_body_bytes=4096, cors_origins=("http://localhost:3000",)
    )
    yield router, base
    await router.stop()


def tune(router: Router, **settings: float) -> None:
    """Shorter deadlines for a test (the sweeper reads them at each pass)."""
    assert router.door is not None
    router.door.settings = dataclasses.replace(router.door.settings, **settings)


async def connect(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = base.removeprefix("http://").rpartition(":")
    return await asyncio.open_connection(host, int(port))


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the router closes the connection (within 5 s)."""
    return await asyncio.wait_for(reader.read(), 5) == b""


async def test_fast_requests_share_a_connection_then_aiohttp_answers_one_and_closes(
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
    writer.write(get("/v1/models", KEY))
    status, headers, body = await read_reply(reader)  # the same connection, now aiohttp's
    assert status == "HTTP/1.1 200 OK" and "aiohttp" in headers["server"]
    assert headers["connection"] == "close"
    assert json.loads(body)["data"][0]["id"] == "demo"
    assert await closed(reader)
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
        (post({"model": "demo"}), "401 Unauthorized"),
        (post({"model": "demo"}, "Authorization: Bearer nope"), "401 Unauthorized"),
        (post({"model": "demo"}, "Authorization: Bearer k", host="Host: evil.example"),
         "403 Forbidden"),
        (get("/v1/models", KEY, host="Host: evil.example"), "403 Forbidden"),
        (post({"model": "demo"}, KEY, host="X-No-Host: 1"), "400 Bad Request"),
        (post({"model": "demo"}, KEY, "no colon here"), "400 Bad Request"),
        (post({"model": "demo"}, KEY, "Content-Length: 5"), "400 Bad Request"),
        (post({"model": "demo"}, KEY).replace(b"\r\n", b"\n"), "400 Bad Request"),
        (post({"model": "demo", "pad": "x" * 5000}, KEY), "413 Content Too Large"),
        (b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"y" * 9000 + b"\r\n\r\n", "431"),
    ],
)  # fmt: skip
async def test_the_front_refuses_and_closes(
    router: tuple[Router, str], request_bytes: bytes, status: str
) -> None:
    reader, writer = await connect(router[1])
    writer.write(request_bytes)
    got, headers, body = await read_reply(reader)
    assert status in got and "server" not in headers, (got, headers)
    assert headers["connection"] == "close"
    assert "message" in json.loads(body)["error"]
    assert await closed(reader)
    writer.close()


async def test_a_content_length_over_the_limit_is_refused_before_any_body(
    router: tuple[Router, str],
) -> None:
    reader, writer = await connect(router[1])
    head = f"POST /v1/chat/completions HTTP/1.1\r\n{HOST}\r\n{KEY}\r\nContent-Length: 1000000000000"
    writer.write(head.encode() + b"\r\n\r\n")  # and no body at all
    status, _, _ = await asyncio.wait_for(read_reply(reader), 5)
    assert status.startswith("HTTP/1.1 413")
    writer.close()


async def test_http10_and_a_chunked_upload(router: tuple[Router, str]) -> None:
    reader, writer = await connect(router[1])
    writer.write(post({"model": "demo"}, KEY).replace(b"HTTP/1.1", b"HTTP/1.0"))
    status, headers, _ = await read_reply(reader)  # aiohttp answers HTTP/1.0 (streams too)
    assert status == "HTTP/1.0 200 OK" and "aiohttp" in headers["server"]
    writer.close()
    reader, writer = await connect(router[1])
    writer.write(
        f"POST /v1/chat/completions HTTP/1.1\r\n{HOST}\r\nTransfer-Encoding: chunked\r\n{KEY}"
        "\r\n\r\n".encode()
        + b'7\r\n{"model\r\n9;ext=1\r\n": "demo"\r\n1\r\n}\r\n0\r\nX-Trailer: t\r\n\r\n'
    )
    status, headers, body = await read_reply(reader)  # de-chunked, on the fast path
    assert status == "HTTP/1.1 200 OK" and "server" not in headers
    assert json.loads(body)["echo"] == {"model": "demo"}
    writer.write(post({"model": "demo", "n": 2}, KEY))  # and the connection goes on
    assert json.loads((await read_reply(reader))[2])["echo"]["n"] == 2
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
    assert await closed(reader)
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


async def test_a_slow_head_and_a_slow_body_get_408(router: tuple[Router, str]) -> None:
    tune(router[0], head_timeout=0.3, body_grace=0.3, min_body_rate=1000)
    reader, writer = await connect(router[1])
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never ends
    status, headers, _ = await asyncio.wait_for(read_reply(reader), 5)
    assert status.startswith("HTTP/1.1 408") and headers["connection"] == "close"
    writer.close()
    reader, writer = await connect(router[1])
    head, _, _ = post({"model": "demo", "pad": "x" * 3000}, KEY).partition(b"\r\n\r\n")
    writer.write(head + b"\r\n\r\n{")  # one byte of ~3 kB, then nothing
    status, _, _ = await asyncio.wait_for(read_reply(reader), 5)
    assert status.startswith("HTTP/1.1 408")
    writer.close()


async def test_the_connection_cap_closes_idle_ones_then_refuses(router: tuple[Router, str]) -> None:
    tune(router[0], max_connections=2)
    first_reader, first = await connect(router[1])
    _, second = await connect(router[1])
    await asyncio.sleep(0.05)
    _, third = await connect(router[1])  # both are idle: the oldest makes room
    assert await closed(first_reader)
    door = router[0].door
    assert door is not None
    await asyncio.sleep(0.05)
    for writer in (second, third):  # now both are reading a head: not idle
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\n")
        await writer.drain()
    await asyncio.sleep(0.05)
    reader, fourth = await connect(router[1])
    status, headers, _ = await read_reply(reader)
    assert status.startswith("HTTP/1.1 503") and headers["connection"] == "close"
    assert door.refused == 1
    for writer in (first, second, third, fourth):
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
    router: tuple[Router, str], upstream: tuple[Upstream, str]
) -> None:
    reader, writer = await connect(router[1])
    writer.write(post({"model": "demo"}, KEY))
    await read_reply(reader)
    busy_reader, busy_writer = await connect(router[1])
    busy_writer.write(post({"model": "demo", "stream": True, "mode": "hold"}, KEY))
    assert (await busy_reader.readline()).startswith(b"HTTP/1.1 200")
    tune(router[0], keepalive=0.05)
    assert await closed(reader)  # the idle one is closed
    door = router[0].door
    assert door is not None and len(door.connections) == 1, "the one answering a stream stays"
    upstream[0].release.set()
    busy_writer.close()
    writer.close()


async def test_cors_is_llamactls_own(
    router: tuple[Router, str], upstream: tuple[Upstream, str]
) -> None:
    seen, _ = upstream
    reader, writer = await connect(router[1])
    allowed = "Origin: http://localhost:3000"
    writer.write(post({"model": "demo", "mode": "cors"}, KEY, allowed))
    status, headers, _ = await read_reply(reader)
    assert status == "HTTP/1.1 200 OK"
    assert headers["access-control-allow-origin"] == "http://localhost:3000"
    assert headers["vary"] == "Origin"
    assert "origin" not in {k.lower() for k in seen.requests[-1][1]}, "Origin is not forwarded"
    writer.write(post({"model": "demo", "mode": "cors"}, KEY))  # no Origin: no CORS header,
    status, headers, _ = await read_reply(reader)  # and llama-server's is never relayed
    assert status == "HTTP/1.1 200 OK" and "access-control-allow-origin" not in headers
    writer.write(get("/v1/models", KEY, allowed))  # aiohttp's answers get it too
    status, headers, _ = await read_reply(reader)
    assert headers["access-control-allow-origin"] == "http://localhost:3000"
    writer.close()


@pytest.mark.parametrize(
    ("origin", "status", "allowed"),
    [("http://localhost:3000", "204", True), ("http://evil.example", "403", False)],
)
async def test_preflight_is_answered_by_llamactl(
    router: tuple[Router, str], origin: str, status: str, allowed: bool
) -> None:
    reader, writer = await connect(router[1])
    writer.write(
        f"OPTIONS /v1/chat/completions HTTP/1.1\r\n{HOST}\r\nOrigin: {origin}\r\n"
        "Access-Control-Request-Method: POST\r\n"
        "Access-Control-Request-Headers: authorization, content-type\r\n\r\n".encode()
    )
    got, headers, _ = await read_reply(reader)
    assert got.split()[1] == status
    assert ("access-control-allow-origin" in headers) is allowed
    if allowed:  # and the connection carries on
        assert headers["access-control-allow-headers"] == "authorization, content-type"
        writer.write(post({"model": "demo", "n": 1}, KEY, f"Origin: {origin}"))
        assert json.loads((await read_reply(reader))[2])["echo"]["n"] == 1
    writer.close()


async def test_a_foreign_origin_needs_the_key(router: tuple[Router, str]) -> None:
    reader, writer = await connect(router[1])
    evil = "Origin: http://evil.example"
    writer.write(post({"model": "demo", "n": 3}, KEY, evil))  # the key holder may
    status, headers, body = await read_reply(reader)
    assert status == "HTTP/1.1 200 OK" and "access-control-allow-origin" not in headers
    writer.write(post({"model": "demo"}, evil, "Content-Type: text/plain"))
    status, _, body = await read_reply(reader)
    assert status == "HTTP/1.1 403 Forbidden"
    assert json.loads(body)["error"]["code"] == "origin_not_allowed"
    writer.close()


async def test_json_nested_too_deep_is_a_400(router: tuple[Router, str]) -> None:
    reader, writer = await connect(router[1])
    deep = b'{"model": "demo", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    head = f"POST /v1/chat/completions HTTP/1.1\r\n{HOST}\r\n{KEY}\r\n"
    tune(router[0], max_body=1 << 20)
    writer.write(f"{head}Content-Length: {len(deep)}\r\n\r\n".encode() + deep)
    status, _, body = await read_reply(reader)
    assert status == "HTTP/1.1 400 Bad Request"
    assert json.loads(body)["error"]["code"] == "json_too_deep"
    writer.write(post({"model": "demo", "n": 4}, KEY))  # and it serves on
    assert json.loads((await read_reply(reader))[2])["echo"]["n"] == 4
    writer.close()
