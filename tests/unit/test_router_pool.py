"""The router's kept-alive upstream connections (``procman.router._upstream.Pool``), against an
in-process aiohttp app that records which connection each request came on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from procman.router import _upstream
from tests.unit.test_router_unit import FakeFleet, ready, serve

BIG = bytes(range(256)) * 4096  # 1 MiB: more than is kept whole


class Seen:
    def __init__(self) -> None:
        self.ports: list[int] = []  # the router's end of each request's connection


def app(seen: Seen) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        seen.ports.append(request.transport.get_extra_info("peername")[1])
        payload = json.loads(await request.read())
        mode = payload.get("mode", "echo")
        if mode == "big":
            return web.Response(body=BIG, content_type="application/octet-stream")
        if mode == "stream":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b"data: 1\n\ndata: [DONE]\n\n")
            return response
        response = web.json_response({"n": len(seen.ports)})
        if mode == "close":  # this answer says Connection: close
            response.force_close()
        return response

    application = web.Application()
    application.router.add_post("/v1/completions", handle)
    return application


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Seen, str]]:
    seen = Seen()
    server = TestServer(app(seen))
    await server.start_server()
    yield seen, str(server.make_url("")).rstrip("/")
    await server.close()


async def post(base: str, body: dict[str, object]) -> tuple[int, dict[str, str], bytes]:
    # a new client connection each time: only the router's upstream side may be reused
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"{base}/v1/completions", json=body) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def test_answers_reuse_one_kept_alive_connection_streams_do_not(
    upstream: tuple[Seen, str],
) -> None:
    seen, url = upstream
    router, base = await serve(FakeFleet(ready("demo", url)))
    try:
        for _ in range(3):
            status, _, body = await post(base, {})
            assert status == 200 and json.loads(body)["n"] >= 1
        assert len(set(seen.ports)) == 1  # three requests, one connection
        for _ in range(2):
            status, _, body = await post(base, {"mode": "stream", "stream": True})
            assert status == 200 and body.endswith(b"data: [DONE]\n\n")
        assert len(set(seen.ports)) == 3  # each stream on its own connection
        assert len(router.forwarder.pool) == 1
    finally:
        await router.stop()
    assert len(router.forwarder.pool) == 0  # closed with the router


async def test_a_connection_the_server_closes_is_not_reused(upstream: tuple[Seen, str]) -> None:
    seen, url = upstream
    router, base = await serve(FakeFleet(ready("demo", url)))
    try:
        assert (await post(base, {"mode": "close"}))[0] == 200
        assert (await post(base, {}))[0] == 200
        assert (await post(base, {}))[0] == 200
        first, second, third = seen.ports
        assert first != second == third
    finally:
        await router.stop()


async def test_an_idle_connection_is_replaced_before_llama_server_would_close_it(
    upstream: tuple[Seen, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen, url = upstream
    monkeypatch.setattr(_upstream, "IDLE_REUSE", 0.05)
    router, base = await serve(FakeFleet(ready("demo", url)))
    try:
        assert (await post(base, {}))[0] == 200
        await asyncio.sleep(0.15)
        assert (await post(base, {}))[0] == 200
        assert seen.ports[0] != seen.ports[1]
    finally:
        await router.stop()


async def test_a_large_answer_passes_through_with_its_length(upstream: tuple[Seen, str]) -> None:
    seen, url = upstream
    router, base = await serve(FakeFleet(ready("demo", url)))
    try:
        status, headers, body = await post(base, {"mode": "big"})
        assert status == 200 and body == BIG
        assert headers["Content-Length"] == str(len(BIG))
        assert headers["Content-Type"] == "application/octet-stream"
        assert (await post(base, {}))[0] == 200
        assert len(set(seen.ports)) == 1  # complete: the connection was kept
    finally:
        await router.stop()


async def test_an_http10_client_still_gets_a_stream(upstream: tuple[Seen, str]) -> None:
    # no chunked encoding in HTTP/1.0: this one stream takes aiohttp's client and server
    _, url = upstream
    router, base = await serve(FakeFleet(ready("demo", url)))
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps({"mode": "stream", "stream": True}).encode()
    head = f"POST /v1/completions HTTP/1.0\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(head.encode() + b"Content-Type: application/json\r\n\r\n" + body)
        answer = await asyncio.wait_for(reader.read(), 5)  # until the router closes
        writer.close()
    finally:
        await router.stop()
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.") and b" 200 " in status + b" "
    assert b"transfer-encoding: chunked" not in rest.lower()
    assert rest.endswith(b"data: 1\n\ndata: [DONE]\n\n")
