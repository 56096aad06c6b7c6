"""`llamactl serve` for real: llama-server processes, real HTTP, the official openai client.

Every test is bounded by timeouts and kills what it started. Timings worth
reporting (serve to first answer, restart after kill -9) are printed; run
with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
from openai.types.chat import ChatCompletionMessageParam

from procman import (
    LogSettings,
    ManagedServer,
    RestartSettings,
    Router,
    RouterSettings,
    ServerError,
    ServerSpec,
    StartupTimeout,
    State,
    bind_listener,
)
from procman.events import Event
from procman.spec import HealthSettings
from procman.supervisor import AsyncSupervisor
from tests.integration.conftest import Processes, generating

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "procman.cli"]
PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello in three words."}
]


# -- helpers ------------------------------------------------------------------------------------
@dataclass
class Served:
    supervisor: AsyncSupervisor
    server: ManagedServer
    base: str
    events: list[Event]
    seconds_to_ready: float

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.base}/v1", api_key="none", max_retries=0, timeout=60
        )


def demo_spec(binary: Path, model: Path, logs: Path, **changes: Any) -> ServerSpec:
    spec = ServerSpec(
        name="demo",
        model=model,
        binary=binary,
        ctx=1024,
        parallel=1,
        startup_timeout=60.0,
        stop_grace=5.0,
        log=LogSettings(directory=logs),
        restart=RestartSettings(backoff_initial=0.1),
    )
    return dataclasses.replace(spec, **changes)


@contextlib.asynccontextmanager
async def running_router(supervisor: AsyncSupervisor) -> AsyncIterator[str]:
    router = Router(supervisor, RouterSettings(ready_timeout=60))
    await router.start(bind_listener("127.0.0.1", 0))
    assert router.address is not None
    try:
        yield f"http://127.0.0.1:{router.address[1]}"
    finally:
        await router.stop()


@pytest.fixture
async def served(llama_server: Path, demo_model: Path, tmp_path: Path) -> AsyncIterator[Served]:
    async with AsyncSupervisor() as supervisor, running_router(supervisor) as base:
        events: list[Event] = []
        supervisor.bus.subscribe(events.append)
        started = time.monotonic()
        server = await asyncio.wait_for(
            supervisor.serve(demo_spec(llama_server, demo_model, tmp_path)), 90
        )
        yield Served(supervisor, server, base, events, time.monotonic() - started)


async def chat(client: openai.AsyncOpenAI) -> str:
    answer = await client.chat.completions.create(
        model="demo",
        messages=PROMPT,
        max_tokens=8,
        temperature=0,
    )
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    return answer.choices[0].message.content or ""


def llama_children(pid: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c for c in children if "llama-server" in " ".join(c.cmdline())]


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    home = str(tmp_path / "home")
    # wide enough that rich never folds a message the tests look for
    return {**os.environ, "LLAMACTL_HOME": home, "LLAMACTL_LOG": "WARNING", "COLUMNS": "400"}


@pytest.fixture
def spy_server(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A stand-in llama-server that only records that it was run."""
    marker = tmp_path / "spawned"
    script = tmp_path / "spy-llama-server"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nsleep 30\n")
    script.chmod(0o755)
    yield script, marker


def fake_server(tmp_path: Path, mode: str) -> Path:
    """A llama-server stand-in that answers /health 200, then misbehaves as ``mode`` says."""
    script = tmp_path / f"fake-llama-server-{mode}"
    script.write_text(
        f"""#!{sys.executable}
import http.server, os, signal, socketserver, sys, threading, time
host = sys.argv[sys.argv.index("--host") + 1]
mode = {mode!r}
print("fake llama-server", mode, flush=True)
if mode == "hang":
    time.sleep(3600)  # never listens: loading forever
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{{"status": "ok"}}')
    def log_message(self, *args):
        pass
if host.endswith(".sock"):  # as llama-server: a host ending in .sock is a Unix socket
    server = socketserver.UnixStreamServer(host, Health)
else:
    server = http.server.HTTPServer((host, int(sys.argv[sys.argv.index("--port") + 1])), Health)
if mode == "crash":
    def crash():
        print("boom: simulated crash", flush=True)
        os._exit(3)
    threading.Timer(0.3, crash).start()
server.serve_forever()
"""
    )
    script.chmod(0o755)
    return script


# -- the real llama-server ----------------------------------------------------------------------
async def test_chat_plain_and_streamed_through_openai_client(served: Served) -> None:
    client = served.client()
    started = time.monotonic()
    text = await chat(client)
    first_answer = time.monotonic() - started
    assert text.strip()

    # relayed as generated: the first piece arrives while llama-server is still generating
    # (a relay that buffers the answer would pass it on only once the server finished)
    stream = await client.chat.completions.create(
        model="anything",
        messages=PROMPT,
        max_tokens=3000,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    assert await generating(served.server.endpoint)
    await stream.close()
    models = await client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    states = [e.state for e in served.events if not e.is_note]  # notes: admitted
    assert states[:3] == [State.STARTING, State.LOADING, State.READY] or states[:2] == [
        State.STARTING,
        State.READY,
    ]
    print(f"\nready after {served.seconds_to_ready:.2f} s; first answer {first_answer:.2f} s later")


async def test_kill_9_of_llama_server_restarts_it(served: Served) -> None:
    client = served.client()
    await chat(client)
    old_pid = served.server.pid
    assert old_pid is not None
    async with served.supervisor.bus.listen() as events:
        killed = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        seen: list[State] = []
        try:
            async with asyncio.timeout(90):
                async for event in events:
                    seen.append(event.state)
                    if event.state is State.READY:
                        break
        except TimeoutError:
            pytest.fail(f"not ready again 90 s after kill -9; states seen: {seen}")
    ready_again = time.monotonic() - killed
    assert seen[0] is State.RESTARTING
    assert "SIGKILL" in served.server.bus.history[-len(seen)].reason
    assert served.server.pid not in (None, old_pid)
    assert (
        not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    )
    await chat(client)
    answered = time.monotonic() - killed
    print(f"\nkill -9 -> ready again {ready_again:.2f} s, answering {answered:.2f} s")


async def test_request_sent_while_loading_waits_and_succeeds(
    llama_server: Path, demo_model: Path, tmp_path: Path
) -> None:
    """The router takes a request for a server that is not ready yet and answers it once
    it is. The server is frozen (SIGSTOP) as it is spawned, so it cannot become ready
    until the router has the request and waits for the server; then it is let go."""
    async with AsyncSupervisor() as supervisor, running_router(supervisor) as base:
        server = supervisor.add(demo_spec(llama_server, demo_model, tmp_path))
        events: list[Event] = []
        frozen: list[int] = []

        def freeze_on_spawn(event: Event) -> None:  # runs in the transition, before any probe
            events.append(event)
            if event.state is State.STARTING and event.pid is not None:
                os.kill(event.pid, signal.SIGSTOP)
                frozen.append(event.pid)

        server.bus.subscribe(freeze_on_spawn)
        received: list[tuple[State, int]] = []  # the server's state, and events so far
        asked = asyncio.Event()
        wait_ready = server.wait_ready

        async def router_waits(timeout: float | None = None) -> bool:  # noqa: ASYNC109
            received.append((server.state, len(events)))
            asked.set()
            return await wait_ready(timeout)

        server.wait_ready = router_waits  # type: ignore[method-assign]
        starting = asyncio.create_task(server.start())
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=90)
        answer = asyncio.create_task(chat(client))
        try:
            try:
                await asyncio.wait_for(asked.wait(), 60)
            except TimeoutError:
                pytest.fail(f"the router never waited for the server; events: {events}")
            state, before = received[0]
            assert frozen and state in {State.STARTING, State.LOADING}, (state, events)
        finally:
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        text = await asyncio.wait_for(answer, 90)
        assert text.strip()
        await starting
        ready = [i for i, e in enumerate(events) if e.state is State.READY]
        assert ready and ready[0] >= before  # it became ready after the router had the request


async def test_a_private_port_taken_meanwhile_is_replaced(
    llama_server: Path, demo_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of picking a free port (a TCP server, as the library runs): llama-server says
    it cannot bind, so another is tried."""
    import dataclasses

    import procman.process.endpoint
    from procman.process._sockets import pick_free_port as real_pick

    with bind_listener("127.0.0.1", 0) as thief:
        taken = thief.getsockname()[1]
        picks = iter([taken])
        monkeypatch.setattr(
            procman.process.endpoint, "pick_free_port", lambda h: next(picks, 0) or real_pick(h)
        )
        spec = dataclasses.replace(demo_spec(llama_server, demo_model, tmp_path), listen="tcp")
        server = ManagedServer(spec, validate=False)
        async with asyncio.timeout(90):
            await server.start()
        try:
            assert server.port not in (None, taken)
            spawns = [e for e in server.bus.history if e.state is State.STARTING]
            assert len(spawns) == 2
            assert f"port {taken} was taken meanwhile" in spawns[1].reason
            assert State.FAILED not in [e.state for e in server.bus.history]
        finally:
            await server.stop()


async def test_stop_leaves_no_process(served: Served) -> None:
    pid = served.server.pid
    assert pid is not None
    await served.supervisor.stop()
    assert served.server.state is State.STOPPED
    assert not psutil.pid_exists(pid)
    assert served.server.pid is None


def test_sigkill_of_the_supervisor_kills_its_servers(
    llama_server: Path, demo_model: Path, cli_env: dict[str, str], processes: Processes
) -> None:
    port = bind_listener("127.0.0.1", 0)
    number = port.getsockname()[1]
    port.close()
    env = cli_env | {"LLAMACTL_SERVER": str(llama_server)}
    proc = processes.popen(
        [*CLI, "serve", str(demo_model), "--port", str(number), "--ctx", "1024"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while http_status(f"http://127.0.0.1:{number}/health") != 200:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "serve did not answer /health with 200 in 120 s"
        time.sleep(0.1)
    children = llama_children(proc.pid)
    assert len(children) == 1
    proc.kill()
    proc.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"llama-server outlived its supervisor: {alive}"


# -- errors before anything is spawned ----------------------------------------------------------
def test_corrupt_model_is_a_clear_error(
    tmp_path: Path, cli_env: dict[str, str], spy_server: tuple[Path, Path]
) -> None:
    script, marker = spy_server
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 7)  # a header cut short
    done = subprocess.run(
        [*CLI, "serve", str(bad), "--server", str(script), "--port", "0"],
        cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "error:" in done.stderr
    assert str(bad) in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists(), "a server was spawned for a corrupt model"


def test_busy_port_is_a_clear_error(
    demo_model: Path, cli_env: dict[str, str], spy_server: tuple[Path, Path]
) -> None:
    script, marker = spy_server
    with bind_listener("127.0.0.1", 0) as busy:
        port = busy.getsockname()[1]
        done = subprocess.run(
            [*CLI, "serve", str(demo_model), "--server", str(script), "--port", str(port)],
            cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists(), "a server was spawned although the port was busy"


# -- supervision with stand-in servers (fast, deterministic misbehaviour) -----------------------
async def test_crash_loop_ends_in_failed_with_the_log_tail(tmp_path: Path) -> None:
    spec = demo_spec(
        fake_server(tmp_path, "crash"),
        tmp_path / "unused.gguf",
        tmp_path,
        restart=RestartSettings(max_restarts=2, window=60, backoff_initial=0.05),
    )
    server = ManagedServer(spec, validate=False)
    failed = asyncio.Event()
    server.bus.subscribe(lambda e: failed.set() if e.state is State.FAILED else None)
    try:
        await server.start()
        await asyncio.wait_for(failed.wait(), 30)
    finally:
        await server.stop()
    failures = [e for e in server.bus.history if e.state is State.FAILED]
    assert failures, [e.state for e in server.bus.history]
    assert "crashes within" in failures[0].reason
    assert "boom: simulated crash" in failures[0].log_tail
    assert [e.state for e in server.bus.history].count(State.RESTARTING) == 2
    assert "fake llama-server" in spec.log_path.read_text()


async def test_server_hanging_while_loading_is_killed_and_reported(tmp_path: Path) -> None:
    spec = demo_spec(
        fake_server(tmp_path, "hang"), tmp_path / "unused.gguf", tmp_path, startup_timeout=1.0
    )
    server = ManagedServer(spec, validate=False)
    pids: list[int] = []
    server.bus.subscribe(lambda e: pids.append(e.pid) if e.pid else None)
    with pytest.raises(StartupTimeout, match="not ready after 1 s") as info:
        await asyncio.wait_for(server.start(), 20)
    assert "fake llama-server hang" in info.value.log_tail
    assert server.state is State.FAILED
    assert pids and not psutil.pid_exists(pids[0])


async def test_stop_escalates_to_sigkill_for_a_server_ignoring_sigterm(tmp_path: Path) -> None:
    spec = demo_spec(
        fake_server(tmp_path, "ignore-term"), tmp_path / "unused.gguf", tmp_path, stop_grace=0.5
    )
    server = ManagedServer(spec, validate=False)
    await asyncio.wait_for(server.start(), 20)
    pid = server.pid
    assert pid is not None
    started = time.monotonic()
    await asyncio.wait_for(server.stop(), 10)
    assert 0.4 < time.monotonic() - started < 5
    assert not psutil.pid_exists(pid)


async def test_failed_first_start_raises_with_the_log_tail(tmp_path: Path) -> None:
    script = tmp_path / "dies"
    script.write_text("#!/bin/sh\necho 'error: unknown model architecture' >&2\nexit 1\n")
    script.chmod(0o755)
    server = ManagedServer(demo_spec(script, tmp_path / "m.gguf", tmp_path), validate=False)
    with pytest.raises(ServerError, match="exit status 1") as info:
        await asyncio.wait_for(server.start(), 20)
    assert "unknown model architecture" in info.value.log_tail


async def test_unhealthy_server_is_restarted(tmp_path: Path) -> None:
    """A server whose /health stops answering is reported unhealthy, then replaced."""
    health = HealthSettings(ready_interval=0.05, timeout=0.5, unhealthy_after=1, restart_after=3)
    spec = demo_spec(
        fake_server(tmp_path, "ok"),
        tmp_path / "unused.gguf",
        tmp_path,
        stop_grace=0.5,
        health=health,
    )
    server = ManagedServer(spec, validate=False)
    await asyncio.wait_for(server.start(), 20)
    try:
        first = server.pid
        assert first is not None
        os.kill(first, signal.SIGSTOP)  # alive but frozen: /health times out
        restarted = asyncio.Event()
        server.bus.subscribe(lambda e: restarted.set() if e.state is State.READY else None)
        await asyncio.wait_for(restarted.wait(), 20)
        states = [e.state for e in server.bus.history]
        assert State.UNHEALTHY in states
        assert State.RESTARTING in states
        assert server.pid != first
        assert not psutil.pid_exists(first)
    finally:
        await server.stop()
