"""The early start (procman.process._early) for real: records, adoption, and hygiene.

A repeated ``llamactl serve`` starts the llama-server its record names
before the CLI loads, and the supervisor adopts it; a model that changed
since is never started early (and is still reported before any spawn); a
SIGKILL of llamactl before the adoption leaves no server behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import psutil
import pytest

from procman.events import Event, State
from procman.process import _early
from procman.process._pdeathsig import child_setup
from procman.process._sockets import pick_free_port
from procman.process.endpoint import Endpoint
from procman.process.server import ManagedServer
from procman.spec import LogSettings, ServerSpec
from tests.integration.conftest import Processes
from tests.integration.test_serve import CLI, REPO, fake_server, http_status, llama_children

PROMPT = [{"role": "user", "content": "Say hello."}]


def unix_status(endpoint: Endpoint, path: str) -> int:
    """The HTTP status a GET over the endpoint's Unix socket gets."""
    assert endpoint.socket is not None
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(endpoint.socket)
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        return int(sock.recv(64).split()[1])


def counting_wrapper(tmp_path: Path, binary: Path) -> tuple[Path, Path]:
    """A --server that appends a line to a file each time it runs, then execs llama-server."""
    runs = tmp_path / "runs"
    wrapper = tmp_path / "llama-server-wrapper"
    wrapper.write_text(f'#!/bin/sh\necho run >> {runs}\nexec {binary} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, runs


@contextlib.contextmanager
def serving(argv: list[str], env: dict[str, str], port: int) -> Iterator[subprocess.Popen[str]]:
    """Run `llamactl serve` until /health says ready; SIGINT it afterwards, and check it ended."""
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while http_status(f"http://127.0.0.1:{port}/health") != 200:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "serve did not answer /health with 200 in 120 s"
            time.sleep(0.05)
        children = llama_children(proc.pid)
        assert children, "serve is ready but runs no llama-server"
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"llama-server outlived serve: {alive}"


def answer(port: int) -> str:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
    reply = client.chat.completions.create(
        model="demo",
        messages=PROMPT,  # type: ignore[arg-type]
        max_tokens=4,
        temperature=0,
    )
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    return reply.choices[0].message.content or ""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = str(tmp_path / "home")
    clean = {k: v for k, v in os.environ.items() if k != "LLAMACTL_EARLY_START"}
    return {**clean, "LLAMACTL_HOME": home, "LLAMACTL_LOG": "WARNING", "COLUMNS": "400"}


def test_a_repeated_serve_starts_its_server_at_launch_and_adopts_it(
    llama_server: Path, demo_model: Path, env: dict[str, str], tmp_path: Path
) -> None:
    wrapper, runs = counting_wrapper(tmp_path, llama_server)
    port = pick_free_port()
    argv = [*CLI, "serve", str(demo_model), "--server", str(wrapper), "--port", str(port)]
    with serving(argv, env, port) as first:
        assert answer(port)
    assert "started at launch" not in (first.stderr.read() if first.stderr else "")
    assert len(list((tmp_path / "home" / "launches").iterdir())) == 1

    with serving(argv, env, port) as second:
        assert answer(port)
        (child,) = llama_children(second.pid)
    log = second.stderr.read() if second.stderr else ""
    assert f"spawned pid {child.pid} on /" in log  # its private socket
    assert "(started at launch, adopted" in log
    assert runs.read_text().count("run") == 2  # one server per run: the early one was adopted


def test_a_model_changed_since_is_reported_and_never_started(
    llama_server: Path, demo_model: Path, env: dict[str, str], tmp_path: Path
) -> None:
    model = tmp_path / "copy.gguf"
    shutil.copyfile(demo_model, model)
    wrapper, runs = counting_wrapper(tmp_path, llama_server)
    port = pick_free_port()
    argv = [*CLI, "serve", str(model), "--server", str(wrapper), "--port", str(port)]
    with serving(argv, env, port):
        pass
    runs.unlink()
    with model.open("r+b") as f:  # truncated in place: the same inode, a new size and ctime
        f.truncate(4096)
    done = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1, done.stderr
    assert "error:" in done.stderr
    assert "Traceback" not in done.stderr
    assert not runs.exists(), "a server was started for a model that no longer validates"


def test_sigkill_of_serve_before_the_adoption_leaves_no_server(
    llama_server: Path, demo_model: Path, env: dict[str, str], processes: Processes
) -> None:
    port = pick_free_port()
    argv = [*CLI, "serve", str(demo_model), "--server", str(llama_server), "--port", str(port)]
    with serving(argv, env, port):
        pass
    proc = processes.popen(
        argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 10
    while not (children := llama_children(proc.pid)):  # the early one, ~50 ms in
        assert proc.poll() is None and time.monotonic() < deadline, "no early start in 10 s"
        time.sleep(0.002)
    proc.kill()
    proc.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"the early llama-server outlived serve: {alive}"


# -- adoption by ManagedServer, with a stand-in server ---------------------------------------------
def early_server(argv: list[str], endpoint: Endpoint) -> _early.EarlyServer:
    assert endpoint.socket is not None
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=child_setup(),  # noqa: PLW1509 - as procman.process._early does
    )
    return _early.EarlyServer(process, argv, endpoint.socket, os.pidfd_open(process.pid))


def stand_in_spec(tmp_path: Path) -> ServerSpec:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")  # never read: validate=False, as serve validated it already
    return ServerSpec(
        name="demo",
        model=model,
        binary=fake_server(tmp_path, "ok"),
        log=LogSettings(directory=tmp_path),
        stop_grace=2.0,
    )


async def test_the_server_adopts_a_process_running_its_command_line(tmp_path: Path) -> None:
    spec = stand_in_spec(tmp_path)
    endpoint = Endpoint.unix(spec.name)
    early = early_server(spec.argv(endpoint), endpoint)
    events: list[Event] = []
    managed = ManagedServer(spec, validate=False)
    managed.bus.subscribe(events.append)
    managed.offer(early)
    await managed.start()
    try:
        assert managed.pid == early.process.pid
        assert managed.endpoint == endpoint
        assert unix_status(endpoint, "/health") == 200
        starting = next(e for e in events if e.state is State.STARTING)
        assert "started at launch" in starting.reason
        early.process.kill()  # a crash after the adoption is seen and restarted as any other
        deadline = time.monotonic() + 20
        while managed.pid in {None, early.process.pid} or managed.state is not State.READY:
            assert time.monotonic() < deadline, f"not restarted: {managed.state}"
            await asyncio.sleep(0.05)
        assert managed.restarts == 1
    finally:
        await managed.stop()
    assert early.process.returncode is not None
    assert "fake llama-server" in spec.log_path.read_text()  # its output before adoption too


async def test_a_process_running_another_command_line_is_killed_not_adopted(
    tmp_path: Path,
) -> None:
    spec = stand_in_spec(tmp_path)
    endpoint = Endpoint.unix(spec.name)
    early = early_server([*spec.argv(endpoint), "--flash-attn", "on"], endpoint)
    managed = ManagedServer(spec, validate=False)
    managed.offer(early)
    await managed.start()
    try:
        assert early.process.returncode is not None, "the mismatched early process still runs"
        assert managed.pid not in {None, early.process.pid}
        assert managed.state is State.READY
    finally:
        await managed.stop()


async def test_an_offer_never_taken_is_killed_by_stop(tmp_path: Path) -> None:
    spec = stand_in_spec(tmp_path)
    endpoint = Endpoint.unix(spec.name)
    early = early_server(spec.argv(endpoint), endpoint)
    managed = ManagedServer(spec, validate=False)
    managed.offer(early)
    await managed.stop()
    assert early.process.returncode is not None
    assert early.process.returncode == -signal.SIGKILL


def test_the_early_start_runs_before_anything_heavy_is_imported() -> None:
    # what procman.process._early's premise rests on: the entry point's package and the early
    # start itself import neither asyncio, typer, rich, aiohttp nor typing
    probe = (
        "import sys; import procman.cli; from procman.process import _early; "
        "print(' '.join(m for m in ('asyncio', 'typer', 'rich', 'aiohttp', 'typing', 'json', "
        "'dataclasses', 'pathlib') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == []


@pytest.mark.parametrize("after", [0.05, 0.15, 0.3])
def test_ctrl_c_while_serve_loads_is_clean_and_leaves_no_server(
    llama_server: Path, demo_model: Path, env: dict[str, str], after: float, processes: Processes
) -> None:
    port = pick_free_port()
    argv = [*CLI, "serve", str(demo_model), "--server", str(llama_server), "--port", str(port)]
    with serving(argv, env, port):
        pass  # the record: the next launch starts its server early
    launched = time.monotonic()
    proc = processes.popen(
        argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    while not (children := llama_children(proc.pid)):  # the early one, ~50 ms in
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - launched < 10, "no llama-server started at launch in 10 s"
        time.sleep(0.002)
    # then the moment to interrupt: while the CLI imports, or adopts, or has the router up
    time.sleep(max(0.0, after - (time.monotonic() - launched)))
    children = llama_children(proc.pid) or children
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    # 130, or killed by the SIGINT itself: what a shell reports as 130 either way (Python
    # ends that way when a second KeyboardInterrupt comes while it exits)
    assert proc.returncode in {0, 130, -signal.SIGINT}, err
    assert "Traceback" not in err
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"llama-server outlived serve: {alive}"
