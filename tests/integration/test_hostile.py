"""Hostile clients against the real router and llama-server (issue #16).

``llamactl serve`` left running on a desktop is reachable by every web page its
user opens and by every local user. Each probe here is a request such a client
can send; each asserts the refusal and that the router still serves a normal
request afterwards. Raw sockets are used where a well-behaved HTTP client would
refuse to send the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from procman import RouterSettings, bind_listener
from procman.router import Router
from procman.supervisor import AsyncSupervisor
from tests.conftest import shared_env
from tests.integration.test_serve import CLI, REPO, demo_spec, http_status, llama_children

KEY = "hostile-suite-key-0123456789"
ALLOWED = "http://localhost:3000"
EVIL = "http://evil.example"
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, object]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        error = data["error"]
        assert isinstance(error, dict)
        return error


def exchange(port: int, data: bytes, *, timeout: float = 30) -> Reply:
    """Send raw bytes, read one answer (Content-Length or chunked), close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        reader = sock.makefile("rb")
        status_line = reader.readline()
        assert status_line, "the connection closed without an answer"
        headers: dict[str, str] = {}
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(reader.readline().strip(), 16):
                body += reader.read(size)
                reader.read(2)
        else:
            body = reader.read(int(headers.get("content-length", "0")))
        return Reply(int(status_line.split()[1]), headers, body)


def request(
    method: str,
    path: str,
    body: bytes | dict[str, object] = b"",
    *,
    host: str | None = "127.0.0.1",
    headers: tuple[str, ...] = (),
) -> bytes:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    lines = [f"{method} {path} HTTP/1.1"]
    lines += [f"Host: {host}"] if host is not None else []
    lines += [*headers, f"Content-Length: {len(data)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


@dataclass
class Serve:
    """A running ``llamactl serve`` (the demo model) and what it was started with."""

    proc: subprocess.Popen[str]
    port: int
    home: Path
    keyed: bool

    @property
    def auth(self) -> tuple[str, ...]:
        return (f"Authorization: Bearer {KEY}",) if self.keyed else ()

    def chat_works(self) -> None:
        reply = exchange(
            self.port, request("POST", "/v1/chat/completions", CHAT, headers=self.auth)
        )
        assert reply.status == 200, reply.body
        assert json.loads(reply.body)["usage"]["completion_tokens"] > 0

    def status(self) -> list[dict[str, object]]:
        reply = exchange(self.port, request("GET", "/admin/status", headers=self.auth))
        assert reply.status == 200
        models = json.loads(reply.body)["models"]
        assert isinstance(models, list)
        return models


@contextlib.contextmanager
def serving(
    llama_server: Path, tmp_path: Path, *args: str, keyed: bool = False, shared: bool = False
) -> Iterator[Serve]:
    """``llamactl serve`` until the block ends (``shared``: kept across a module's tests)."""
    home = tmp_path / "home"
    env = {**os.environ, "LLAMACTL_HOME": str(home), "LLAMACTL_EARLY_START": "0"}
    env = shared_env(env) if shared else env
    port = bind_listener("127.0.0.1", 0).getsockname()[1]
    if keyed:
        key_file = tmp_path / "key"
        key_file.write_text(f"# the router's key\n{KEY}\n")
        args = (*args, "--api-key-file", str(key_file))
    argv = [*CLI, "serve", "--server", str(llama_server), "--port", str(port), *args]
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 90
        while http_status(f"http://127.0.0.1:{port}/health") != 200:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.05)
        yield Serve(proc, port, home, keyed)
    finally:
        children = llama_children(proc.pid)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        psutil.wait_procs(children, timeout=5)


@pytest.fixture(scope="module")
def open_serve(llama_server: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """``llamactl serve`` as a desktop user leaves it: loopback, no key, one listed origin."""
    with serving(
        llama_server, tmp_path_factory.mktemp("open"), "--cors-origin", ALLOWED, shared=True
    ) as served:
        yield served


# -- web pages: DNS rebinding and cross-site requests ------------------------------------------
@pytest.mark.parametrize(
    "probe",
    [
        request("GET", "/v1/models", host="evil.example"),
        request("GET", "/v1/models", host="evil.example:8080"),
        request("POST", "/v1/chat/completions", CHAT, host="evil.example"),
        request("GET", "/admin/status", host="rebind.attacker.test"),
        request("GET", "/metrics", host="evil.example"),
    ],
    ids=["models", "models-port", "chat", "admin-status", "metrics"],
)
def test_dns_rebinding_is_refused(open_serve: Serve, probe: bytes) -> None:
    reply = exchange(open_serve.port, probe)
    assert reply.status == 403
    assert reply.error()["code"] == "host_not_allowed"
    assert b"demo" not in reply.body, "nothing about the models leaks"
    open_serve.chat_works()


def test_http11_without_host_is_a_400(open_serve: Serve) -> None:
    reply = exchange(open_serve.port, request("GET", "/v1/models", host=None))
    assert reply.status == 400
    open_serve.chat_works()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/admin/unload/demo", b""),
        ("POST", "/admin/unload", b""),
        ("POST", "/admin/load/demo", b""),
        ("POST", "/v1/chat/completions", json.dumps(CHAT).encode()),
        ("POST", "/v1/completions", b'{"prompt": "Hi", "max_tokens": 1}'),
        ("GET", "/v1/models", b""),
    ],
)
def test_a_cross_site_page_can_neither_drive_nor_read_it(
    open_serve: Serve, method: str, path: str, body: bytes
) -> None:
    # text/plain: a "simple" request any page can send without a preflight
    probe = request(method, path, body, headers=(f"Origin: {EVIL}", "Content-Type: text/plain"))
    reply = exchange(open_serve.port, probe)
    assert reply.status == 403
    assert reply.error()["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in reply.headers
    (model,) = open_serve.status()
    assert model["state"] == "ready", "the model must still be loaded"
    open_serve.chat_works()


def test_a_no_cors_cross_site_request_without_origin_is_refused(open_serve: Serve) -> None:
    probe = request("POST", "/admin/unload/demo", headers=("Sec-Fetch-Site: cross-site",))
    assert exchange(open_serve.port, probe).status == 403
    open_serve.chat_works()


def test_an_allowed_origin_gets_llamactls_cors_and_never_llama_servers(
    open_serve: Serve,
) -> None:
    preflight = request(
        "OPTIONS",
        "/v1/chat/completions",
        headers=(
            f"Origin: {ALLOWED}",
            "Access-Control-Request-Method: POST",
            "Access-Control-Request-Headers: content-type",
        ),
    )
    reply = exchange(open_serve.port, preflight)
    assert reply.status == 204
    assert reply.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in reply.headers["access-control-allow-methods"]
    refused = exchange(open_serve.port, preflight.replace(ALLOWED.encode(), EVIL.encode()))
    assert refused.status == 403 and "access-control-allow-origin" not in refused.headers

    probe = request("POST", "/v1/chat/completions", CHAT, headers=(f"Origin: {ALLOWED}",))
    reply = exchange(open_serve.port, probe)
    assert reply.status == 200 and reply.headers["access-control-allow-origin"] == ALLOWED
    # llama-server answers every request with its own Access-Control-Allow-Origin: never relayed
    plain = exchange(open_serve.port, request("POST", "/v1/chat/completions", CHAT))
    assert plain.status == 200 and "access-control-allow-origin" not in plain.headers
    stream = {**CHAT, "stream": True}
    streamed = exchange(open_serve.port, request("POST", "/v1/chat/completions", stream))
    assert streamed.status == 200 and "access-control-allow-origin" not in streamed.headers


# -- malformed and oversize requests -------------------------------------------------------------
MALFORMED = {
    "non-ASCII digit length": request("POST", "/v1/chat/completions", CHAT).replace(
        b"Content-Length: ", "Content-Length: \u00b2".encode()
    ),
    "bare LF": request("POST", "/v1/chat/completions", CHAT).replace(b"\r\n", b"\n"),
    "CR in a value": request("GET", "/v1/models", headers=("X-A: a\rb",)),
    "NUL in a value": request("GET", "/v1/models", headers=("X-A: a\x00b",)),
    "LF in the target": b"GET /v1/mo\ndels HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "101 header lines": request(
        "GET", "/v1/models", headers=tuple(f"X-{i}: v" for i in range(101))
    ),
    "a 9 KiB head": request("GET", "/v1/models", headers=("X-Big: " + "y" * 9000,)),
    "both lengths": request(
        "POST", "/v1/chat/completions", CHAT, headers=("Transfer-Encoding: chunked",)
    ),
    "a 1 TB body": b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Length: 1000000000000\r\n\r\n",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_heads_are_refused_at_once(open_serve: Serve, name: str) -> None:
    started = time.monotonic()
    reply = exchange(open_serve.port, MALFORMED[name], timeout=10)
    assert reply.status in {400, 413, 431}, (name, reply)
    assert reply.headers.get("connection") == "close"
    assert time.monotonic() - started < 10, "refused at once, not after a timeout"
    open_serve.chat_works()


def test_deeply_nested_json_is_a_400_not_a_traceback(open_serve: Serve) -> None:
    deep = b'{"model": "demo", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    reply = exchange(open_serve.port, request("POST", "/v1/chat/completions", deep))
    assert reply.status == 400 and reply.error()["code"] == "json_too_deep"
    open_serve.chat_works()
    assert open_serve.proc.poll() is None


# -- slow clients and the connection cap (an in-process router, to shorten the deadlines) --------
@pytest.fixture
async def tight_router(llama_server: Path, demo_model: Path, tmp_path: Path) -> AsyncIterator[int]:
    settings = RouterSettings(head_timeout=1.0, min_body_rate=1000, max_connections=8)
    async with AsyncSupervisor() as supervisor:
        spec = demo_spec(llama_server, demo_model, tmp_path)
        await asyncio.wait_for(supervisor.serve(spec), 90)
        router = Router(supervisor, settings)
        await router.start(bind_listener("127.0.0.1", 0))
        assert router.address is not None and router.door is not None
        import dataclasses

        router.door.settings = dataclasses.replace(router.door.settings, body_grace=1.0)
        try:
            yield router.address[1]
        finally:
            await router.stop()


async def answers(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request("POST", "/v1/chat/completions", CHAT))
    status = int((await asyncio.wait_for(reader.readline(), 30)).split()[1])
    writer.close()
    return status


async def test_slow_heads_and_bodies_are_cut_off(tight_router: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", tight_router)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    line = await asyncio.wait_for(reader.readline(), 10)  # a byte a second would be too late
    assert line.startswith(b"HTTP/1.1 408")
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", tight_router)
    head, _, body = request("POST", "/v1/chat/completions", b" " * 10_000).partition(b"\r\n\r\n")
    writer.write(head + b"\r\n\r\n" + body[:10])  # 10 bytes of 10 kB, then nothing
    line = await asyncio.wait_for(reader.readline(), 10)
    assert line.startswith(b"HTTP/1.1 408")
    writer.close()
    assert await answers(tight_router) == 200


async def test_the_connection_cap_refuses_with_503_and_recovers(tight_router: int) -> None:
    held = []
    for _ in range(8):  # each has begun a head: not idle, so not closed to make room
        reader, writer = await asyncio.open_connection("127.0.0.1", tight_router)
        writer.write(b"GET /v1/models HTTP/1.1\r\n")
        held.append((reader, writer))
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", tight_router)
    line = await asyncio.wait_for(reader.readline(), 10)
    assert line.startswith(b"HTTP/1.1 503")
    writer.close()
    for _, each in held:
        each.close()
    await asyncio.sleep(0.2)
    assert await answers(tight_router) == 200


# -- local users ---------------------------------------------------------------------------------
def private_socket(serve: Serve) -> str:
    (child,) = llama_children(serve.proc.pid)
    argv = child.cmdline()
    path = argv[argv.index("--host") + 1]
    assert path.endswith(".sock")
    assert not child.net_connections(kind="inet"), "llama-server listens on no TCP port"
    return path


def test_a_local_user_cannot_reach_the_private_server(open_serve: Serve) -> None:
    path = private_socket(open_serve)
    folder = Path(path).parent.stat()
    assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.getuid()
    if os.getuid() != 0:
        return  # another user's attempt needs root to stage; the folder's mode is the proof
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n"
        "sys.exit(0)\n"
    )
    nobody = 65534
    done = subprocess.run(
        ["python3", "-c", probe, path],
        user=nobody,
        group=nobody,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 13, done.stderr
    open_serve.chat_works()


# -- secrets, and a model that was stopped --------------------------------------------------------
def test_the_key_stays_out_of_argv_logs_status_and_errors(
    llama_server: Path, tmp_path: Path
) -> None:
    with serving(llama_server, tmp_path, keyed=True) as served:
        assert KEY not in " ".join(psutil.Process(served.proc.pid).cmdline())
        for child in llama_children(served.proc.pid):
            assert KEY not in " ".join(child.cmdline())
        assert exchange(served.port, request("GET", "/v1/models")).status == 401
        wrong = exchange(
            served.port, request("GET", "/v1/models", headers=("Authorization: Bearer x",))
        )
        assert wrong.status == 401 and KEY.encode() not in wrong.body
        # Anthropic's clients send x-api-key
        assert (
            exchange(
                served.port, request("GET", "/v1/models", headers=(f"x-api-key: {KEY}",))
            ).status
            == 200
        )
        assert KEY not in json.dumps(served.status())
        served.chat_works()
        logs = "".join(p.read_text(errors="replace") for p in (served.home / "logs").glob("*"))
        assert logs and KEY not in logs
    out, err = served.proc.communicate()
    assert KEY not in out + err


def test_an_unloaded_model_starts_again_on_the_next_request(
    llama_server: Path, tmp_path: Path
) -> None:
    with serving(llama_server, tmp_path, keyed=True) as served:
        unload = request("POST", "/admin/unload/demo", headers=served.auth)
        assert exchange(served.port, unload).status == 200
        assert served.status()[0]["state"] == "stopped"
        served.chat_works()  # not 503 until someone restarts serve by hand
        assert served.status()[0]["state"] == "ready"


# -- GGUF files ----------------------------------------------------------------------------------
def nested_gguf(path: Path, depth: int) -> Path:
    """A GGUF whose one metadata value is an array nested ``depth`` deep."""

    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    array, uint32 = 9, 4
    value = struct.pack("<IQ", uint32, 0)  # the innermost: an empty uint32 array
    for _ in range(depth - 1):
        value = struct.pack("<IQ", array, 1) + value
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + string("x.nested") + struct.pack("<I", array)
    path.write_bytes(data + value)
    return path


@pytest.mark.parametrize("command", ["estimate", "serve"])
def test_a_gguf_nested_too_deep_is_a_clean_error(
    tmp_path: Path, llama_server: Path, command: str
) -> None:
    model = nested_gguf(tmp_path / "deep.gguf", 100_000)
    env = {**os.environ, "LLAMACTL_HOME": str(tmp_path / "home")}
    argv = [*CLI, command, str(model)]
    if command == "serve":
        argv += ["--server", str(llama_server), "--port", "0"]
    done = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1, done.stderr
    assert "truncated or corrupt" in done.stderr
    assert "Traceback" not in done.stderr and "RecursionError" not in done.stderr
