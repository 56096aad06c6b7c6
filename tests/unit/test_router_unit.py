"""The router against a fake llama-server (an in-process aiohttp app): no processes.

Covers routing by ``model``, the API key, waiting for a starting server,
503 + Retry-After, chunk-by-chunk streaming, and that a client going away
closes its upstream request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from procman.errors import ConfigError
from procman.events import State
from procman.process.endpoint import Endpoint
from procman.router import Router, RouterSettings, check_exposure
from procman.router.listen import bind_listener
from procman.spec import ServerSpec
from procman.supervisor import AsyncSupervisor


@dataclass
class FakeServer:
    """Stands in for a ManagedServer: the router only reads these."""

    name: str
    url: str | None = None
    aliases: tuple[str, ...] = ()
    state: State = State.STARTING
    last_reason: str = "spawned"
    pipeline: int = 8
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def endpoint(self) -> Endpoint | None:
        if self.url is None:
            return None
        host, _, port = self.url.removeprefix("http://").rpartition(":")
        return Endpoint(host=host, port=int(port))

    def retry_in(self) -> float:
        return 0.0

    def become(self, state: State, url: str | None = None) -> None:
        self.state = state
        self.url = url or self.url
        if state in {State.READY, State.UNHEALTHY}:
            self._ready.set()
        else:
            self._ready.clear()

    async def wait_ready(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        if self.state.is_final:
            return False
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True


class FakeFleet:
    def __init__(self, *servers: FakeServer) -> None:
        self.servers = list(servers)

    def find(self, model: str | None) -> FakeServer | None:
        if len(self.servers) == 1:
            return self.servers[0]
        return next((s for s in self.servers if model in (s.name, *s.aliases)), None)

    def upstreams(self) -> Sequence[FakeServer]:
        return self.servers


@dataclass
class Upstream:
    """What the fake llama-server saw."""

    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)


async def until(check: Callable[[], bool], what: str, timeout: float = 5) -> None:  # noqa: ASYNC109
    """Wait for a condition of the in-process router or upstream (neither has an event)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"not in {timeout:g} s: {what}"
        await asyncio.sleep(0.005)


def fake_llama_app(seen: Upstream) -> web.Application:
    """One handler for every path; the body's "mode" picks the behaviour."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.requests.append((request.path, dict(request.headers), body))
        payload = json.loads(body)
        mode = payload.get("mode", "echo")
        if mode == "echo":
            return web.json_response({"path": request.path, "echo": payload})
        if mode == "cors":  # as llama-server does: it reflects any Origin
            cors = {"Access-Control-Allow-Origin": request.headers.get("Origin", "*")}
            return web.json_response({"echo": payload}, headers=cors)
        if mode.startswith("hangup"):  # "hangup-N": the first N requests get no answer at all
            if len(seen.requests) <= int(mode.split("-")[1]):
                assert request.transport is not None
                request.transport.abort()
            return web.json_response({"attempt": len(seen.requests)})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            if mode == "silent":  # thinks without answering, until the caller leaves
                await asyncio.sleep(60)
            await response.prepare(request)
            await response.write(b'data: {"n": 1}\n\n')
            if mode == "hold":  # chunk 2 only when the test says so
                await seen.release.wait()
                await response.write(b'data: {"n": 2}\n\ndata: [DONE]\n\n')
            elif mode == "broken":  # dies mid-answer
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.abort()
            else:  # "forever"
                while True:
                    await asyncio.sleep(0.02)
                    await response.write(b"data: {}\n\n")
        except (asyncio.CancelledError, ConnectionResetError):
            seen.gone.set()
            raise
        return response

    async def anything(request: web.Request) -> web.Response:
        """Every other endpoint: what arrived, as llama-server got it."""
        body = await request.read()
        seen.requests.append((request.path, dict(request.headers), body))
        answer = {"method": request.method, "path": request.path, "query": request.query_string}
        return web.json_response({**answer, "body": body.decode("utf-8", "replace")})

    app = web.Application()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.router.add_post(path, handle)
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    seen = Upstream()
    server = TestServer(fake_llama_app(seen))
    await server.start_server()
    yield seen, str(server.make_url("")).rstrip("/")
    await server.close()


def ready(name: str, url: str, *aliases: str) -> FakeServer:
    server = FakeServer(name, url, aliases=aliases)
    server.become(State.READY)
    return server


async def serve(fleet: FakeFleet, **settings: object) -> tuple[Router, str]:
    router = Router(fleet, RouterSettings(**settings))  # type: ignore[arg-type]
    await router.start(bind_listener("127.0.0.1", 0))
    assert router.address is not None
    return router, f"http://127.0.0.1:{router.address[1]}"


@pytest.fixture(params=[False, True], ids=["aiohttp-relay", "raw-stream-relay"])
def stream(request: pytest.FixtureRequest) -> dict[str, bool]:
    """Merged into request bodies: ``"stream": true`` takes the router's raw relay."""
    return {"stream": True} if request.param else {}


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def test_forwards_the_body_verbatim_without_our_auth_header(
    upstream: tuple[Upstream, str], client: aiohttp.ClientSession, stream: dict[str, bool]
) -> None:
    seen, url = upstream
    router, base = await serve(FakeFleet(ready("demo", url)), api_key="k")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **stream}
    try:
        async with client.post(
            f"{base}/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"}
        ) as resp:
            assert resp.status == 200
            assert await resp.json() == {"path": "/v1/chat/completions", "echo": body}
            assert len(resp.headers.getall("Content-Type")) == 1
    finally:
        await router.stop()
    _, sent_headers, raw = seen.requests[0]
    assert json.loads(raw) == body
    assert "Authorization" not in sent_headers


async def test_streams_chunk_by_chunk(
    upstream: tuple[Upstream, str], client: aiohttp.ClientSession, stream: dict[str, bool]
) -> None:
    seen, url = upstream
    router, base = await serve(FakeFleet(ready("demo", url)))
    try:
        async with client.post(
            f"{base}/v1/chat/completions", json={"mode": "hold", **stream}
        ) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
            assert first == b'data: {"n": 1}\n\n'  # here while the upstream still holds chunk 2
            seen.release.set()
            rest = await asyncio.wait_for(resp.content.read(), 5)
            assert rest.endswith(b"data: [DONE]\n\n")
    finally:
        await router.stop()
    # the raw relay opens a connection per stream; aiohttp's pool keeps them alive
    _, sent_headers, _ = seen.requests[0]
    assert (sent_headers.get("Connection") == "close") == bool(stream)


async def test_leaving_mid_stream_closes_the_upstream_request(
    upstream: tuple[Upstream, str], client: aiohttp.ClientSession, stream: dict[str, bool]
) -> None:
    seen, url = upstream
    router, base = await serve(FakeFleet(ready("demo", url)))
    try:
        resp = await client.post(f"{base}/v1/chat/completions", json={"mode": "forever", **stream})
        await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        resp.close()  # the client hangs up
        await asyncio.wait_for(seen.gone.wait(), 5)
    finally:
        await router.stop()


async def test_leaving_before_any_answer_closes_the_upstream_request(
    upstream: tuple[Upstream, str], client: aiohttp.ClientSession, stream: dict[str, bool]
) -> None:
    seen, url = upstream
    router, base = await serve(FakeFleet(ready("demo", url)))
    try:
        with pytest.raises(TimeoutError):
            async with client.post(
                f"{base}/v1/completions",
                json={"mode": "silent", **stream},
                timeout=aiohttp.ClientTimeout(total=0.3),
            ) as resp:
                await resp.read()
        await asyncio.wait_for(seen.gone.wait(), 5)
    finally:
        await router.stop()


async def test_waits_for_a_starting_server(
    upstream: tuple[Upstream, str], client: aiohttp.ClientSession, stream: dict[str, bool]
) -> None:
    _, url = upstream
    starting = FakeServer("demo")
    router, base = await serve(FakeFleet(starting), ready_timeout=10)

    async def load() -> None:
        await asyncio.sleep(0.2)
        starting.become(State.LOADING)
        await asyncio.sleep(0.1)
        starting.become(State.READY, url)

    loader = asyncio.create_task(load())
    try:
        async with client.post(
            f"{base}/v1/chat/completions", json={"messages": [], **stream}
        ) as resp:
            assert resp.status == 200
    finally:
        await loader
        await router.stop()


async def test_not_ready_in_time_is_503_with_retry_after(client: aiohttp.ClientSession) -> None:
    router, base = await serve(FakeFleet(FakeServer("demo")), ready_timeout=0.1, retry_after=7)
    try:
        async with client.post(f"{base}/v1/chat/completions", json={}) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "7"
            error = (await resp.json())["error"]
            assert error["code"] == "model_not_ready"
    finally:
        await router.stop()


async def test_failed_server_is_503_with_its_reason(client: aiohttp.ClientSession) -> None:
    failed = FakeServer("demo", state=State.FAILED, last_reason="6 crashes within 60 s")
    router, base = await serve(FakeFleet(failed))
    try:
        async with client.post(f"{base}/v1/completions", json={}) as resp:
            assert resp.status == 503
            assert "Retry-After" not in resp.headers
            assert "6 crashes" in (await resp.json())["error"]["message"]
    finally:
        await router.stop()


async def test_connection_refused_is_retried_until_restarted(
    upstream: tuple[Upstream, str], client: aiohttp.ClientSession, stream: dict[str, bool]
) -> None:
    from procman.process._sockets import pick_free_port

    _, url = upstream
    crashed = ready("demo", f"http://127.0.0.1:{pick_free_port()}")  # nobody listens there
    router, base = await serve(FakeFleet(crashed), ready_timeout=10)

    async def restart() -> None:
        await asyncio.sleep(0.1)
        crashed.become(State.RESTARTING)
        await asyncio.sleep(0.1)
        crashed.become(State.READY, url)

    restarter = asyncio.create_task(restart())
    try:
        async with client.post(
            f"{base}/v1/chat/completions", json={"messages": [], **stream}
        ) as resp:
            assert resp.status == 200
    finally:
        await restarter
        await router.stop()


async def test_a_connection_lost_before_any_answer_is_sent_once_more(
    upstream: tuple[Upstream, str], client: aiohttp.ClientSession, stream: dict[str, bool]
) -> None:
    seen, url = upstream
    router, base = await serve(FakeFleet(ready("demo", url)))
    try:
        async with client.post(
            f"{base}/v1/completions", json={"mode": "hangup-1", **stream}
        ) as resp:
            assert resp.status == 200
            assert await resp.json() == {"attempt": 2}
        seen.requests.clear()
        async with client.post(
            f"{base}/v1/completions", json={"mode": "hangup-9", **stream}
        ) as resp:
            assert resp.status == 502  # never a third time: it could be the request's fault
            assert (await resp.json())["error"]["code"] == "upstream_error"
        assert len(seen.requests) == 2
    finally:
        await router.stop()


async def test_upstream_dying_mid_stream_is_not_a_clean_end(
    upstream: tuple[Upstream, str], client: aiohttp.ClientSession, stream: dict[str, bool]
) -> None:
    """Never an answer that looks complete: an event stream cut between two chunks ends
    with an error event that says so (the connection is cut otherwise)."""
    _, url = upstream
    router, base = await serve(FakeFleet(ready("demo", url)))
    try:
        async with client.post(f"{base}/v1/completions", json={"mode": "broken", **stream}) as resp:
            body = await resp.read()  # a well-framed end: no payload error
        first, error, rest = body.split(b"\n\n", 2)
        assert first == b'data: {"n": 1}' and rest == b""
        assert error.startswith(b"data: ")
        detail = json.loads(error.removeprefix(b"data: "))["error"]
        assert detail["code"] == "upstream_error" and "incomplete" in detail["message"]
    finally:
        await router.stop()


async def test_routes_by_model_name_and_alias(
    upstream: tuple[Upstream, str], client: aiohttp.ClientSession
) -> None:
    _, url = upstream
    a, b = ready("a", url), FakeServer("b", aliases=("bee",))
    router, base = await serve(FakeFleet(a, b), ready_timeout=0.1)
    try:
        async with client.post(f"{base}/v1/chat/completions", json={"model": "a"}) as resp:
            assert resp.status == 200
        async with client.post(f"{base}/v1/chat/completions", json={"model": "bee"}) as resp:
            assert resp.status == 503  # b is found (and still starting)
        for body in ({"model": "c"}, {}):
            async with client.post(f"{base}/v1/chat/completions", json=body) as resp:
                assert resp.status == 404
                error = (await resp.json())["error"]
                assert error["code"] == "model_not_found"
                assert "a, b" in error["message"]
        async with client.get(f"{base}/v1/models") as resp:
            data = (await resp.json())["data"]
            assert [(m["id"], m["state"]) for m in data] == [("a", "ready"), ("b", "starting")]
    finally:
        await router.stop()


async def test_bad_bodies_are_400(client: aiohttp.ClientSession) -> None:
    router, base = await serve(FakeFleet(FakeServer("demo")))
    try:
        for body in (b"{nope", b"[1, 2]", b'{"model": 5}'):
            async with client.post(f"{base}/v1/chat/completions", data=body) as resp:
                assert resp.status == 400
    finally:
        await router.stop()


async def test_api_key_guards_everything_but_health(client: aiohttp.ClientSession) -> None:
    router, base = await serve(FakeFleet(ready("demo", "http://127.0.0.1:9")), api_key="s3cret")
    try:
        async with client.get(f"{base}/health") as resp:
            assert resp.status == 200
            assert (await resp.json())["models"]["demo"]["state"] == "ready"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            async with client.get(f"{base}/v1/models", headers=headers) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"] == "Bearer"
                assert (await resp.json())["error"]["code"] == "invalid_api_key"
            async with client.post(f"{base}/v1/completions", json={}, headers=headers) as resp:
                assert resp.status == 401
        good = {"Authorization": "Bearer s3cret"}
        async with client.get(f"{base}/v1/models", headers=good) as resp:
            assert resp.status == 200
    finally:
        await router.stop()


async def test_health_is_503_until_every_server_is_up(client: aiohttp.ClientSession) -> None:
    server = FakeServer("demo", state=State.LOADING)
    router, base = await serve(FakeFleet(server))
    try:
        async with client.get(f"{base}/health") as resp:
            assert resp.status == 503
            assert (await resp.json())["status"] == "unavailable"
        server.become(State.UNHEALTHY)  # up, if slow: still served
        async with client.get(f"{base}/health") as resp:
            assert resp.status == 200
    finally:
        await router.stop()


def test_exposure_needs_a_key_or_consent() -> None:
    check_exposure("127.0.0.1", None)
    check_exposure("localhost", None)
    check_exposure("0.0.0.0", "key")
    check_exposure("0.0.0.0", None, allow_unauthenticated=True)
    with pytest.raises(ConfigError, match="without an API key") as info:
        check_exposure("0.0.0.0", None)
    assert info.value.hint and "--api-key" in info.value.hint


def test_supervisor_finds_servers_by_name_and_alias(tmp_path: Path) -> None:
    def spec(name: str, *aliases: str) -> ServerSpec:
        return ServerSpec(
            name=name, aliases=aliases, model=tmp_path / "m.gguf", binary=tmp_path / "llama-server"
        )

    supervisor = AsyncSupervisor()
    only = supervisor.add(spec("a", "alpha"))
    assert supervisor.find(None) is only
    assert supervisor.find("anything") is only  # one model: any name reaches it
    other = supervisor.add(spec("b"))
    assert supervisor.find("alpha") is only
    assert supervisor.find("b") is other
    assert supervisor.find(None) is None
    assert supervisor.find("c") is None
    with pytest.raises(ConfigError, match="already served"):
        supervisor.add(spec("c", "b"))
    assert only.state is State.STOPPED


async def test_in_flight_requests_are_bounded_by_the_servers_pipeline(
    upstream: tuple[Upstream, str], client: aiohttp.ClientSession
) -> None:
    # an unconfigured model still gets a queue: `pipeline` in flight, the rest wait in order
    seen, url = upstream
    server = ready("demo", url)
    server.pipeline = 3
    router, base = await serve(FakeFleet(server))

    async def one() -> bytes:
        async with client.post(f"{base}/v1/completions", json={"mode": "hold"}) as resp:
            return await resp.read()

    try:
        calls = [asyncio.create_task(one()) for _ in range(5)]
        # every request is in the router (three forwarded, two waiting in line) before the
        # upstream is counted: none can be on its way there unseen
        await until(lambda: len(seen.requests) == 3, "three requests reach the upstream")
        queue = router.scheduler.queue("demo")
        await until(lambda: queue is not None and queue.waiting == 2, "two wait in line")
        assert len(seen.requests) == 3  # its pipeline, not five
        seen.release.set()
        answers = await asyncio.wait_for(asyncio.gather(*calls), 5)
        assert all(a.endswith(b"data: [DONE]\n\n") for a in answers)
        assert len(seen.requests) == 5
    finally:
        await router.stop()


@pytest.mark.parametrize(
    ("method", "target", "body", "model"),
    [
        ("POST", "/v1/messages", {"model": "other", "max_tokens": 1, "messages": []}, "other"),
        ("POST", "/v1/responses", {"model": "other", "input": "hi"}, "other"),
        ("POST", "/infill", {"model": "other", "input_prefix": "a"}, "other"),
        ("POST", "/tokenize", {"model": "other", "content": "hi"}, "other"),
        ("POST", "/v1/rerank", {"model": "other", "query": "q", "documents": ["d"]}, "other"),
        ("GET", "/props?model=other", None, "other"),
        ("GET", "/slots?model=other", None, "other"),
        ("GET", "/metrics?model=other", None, "other"),
        ("POST", "/slots/0?action=erase&model=other", None, "other"),
    ],
)
async def test_every_model_endpoint_goes_to_the_model_it_names(
    upstream: tuple[Upstream, str],
    client: aiohttp.ClientSession,
    method: str,
    target: str,
    body: dict[str, object] | None,
    model: str,
) -> None:
    _, url = upstream
    demo, other = ready("demo", "http://127.0.0.1:1"), ready("other", url)  # demo: nothing there
    router, base = await serve(FakeFleet(demo, other))
    try:
        async with client.request(method, f"{base}{target}", json=body) as resp:
            assert resp.status == 200, await resp.text()
            echoed = await resp.json()
        path, _, query = target.partition("?")
        assert (echoed["method"], echoed["path"], echoed["query"]) == (method, path, query)
    finally:
        await router.stop()


async def test_an_unknown_model_is_a_404_in_the_shape_of_its_api(
    upstream: tuple[Upstream, str], client: aiohttp.ClientSession
) -> None:
    _, url = upstream
    router, base = await serve(FakeFleet(ready("demo", url), ready("other", url)))
    try:
        body = {"model": "nope", "max_tokens": 1, "messages": []}
        async with client.post(f"{base}/v1/messages", json=body) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["type"] == "not_found_error"
            assert (await resp.json())["type"] == "error"
        async with client.post(f"{base}/v1/responses", json={"model": "nope"}) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "model_not_found"
        async with client.get(f"{base}/props") as resp:  # two models: which one?
            assert resp.status == 404 and "several models" in (await resp.text())
    finally:
        await router.stop()


async def test_anthropic_clients_authenticate_with_x_api_key(
    upstream: tuple[Upstream, str], client: aiohttp.ClientSession
) -> None:
    seen, url = upstream
    router, base = await serve(FakeFleet(ready("demo", url)), api_key="k")
    body = {"model": "demo", "max_tokens": 1, "messages": []}
    try:
        async with client.post(f"{base}/v1/messages", json=body) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["type"] == "authentication_error"
        headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
        async with client.post(f"{base}/v1/messages", json=body, headers=headers) as resp:
            assert resp.status == 200
        forwarded = {k.lower() for k in seen.requests[-1][1]}
        assert "x-api-key" not in forwarded and "anthropic-version" in forwarded
    finally:
        await router.stop()


async def test_a_transcription_is_routed_by_its_form_field(
    upstream: tuple[Upstream, str], client: aiohttp.ClientSession
) -> None:
    _, url = upstream
    router, base = await serve(FakeFleet(ready("demo", "http://127.0.0.1:1"), ready("stt", url)))
    form = aiohttp.FormData()
    form.add_field("file", b"RIFF....", filename="a.wav", content_type="audio/wav")
    form.add_field("model", "stt")
    try:
        async with client.post(f"{base}/v1/audio/transcriptions", data=form) as resp:
            assert resp.status == 200, await resp.text()
            echoed = await resp.json()
        assert echoed["path"] == "/v1/audio/transcriptions" and "RIFF" in echoed["body"]
    finally:
        await router.stop()
