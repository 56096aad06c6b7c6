"""examples/desktop/chat.py, a Tk window embedding llamactl, on a real X server (Xvfb).

The app is its own process; the test reads its widgets with Tk's ``send``,
types with xdotool, and closes the window with the WM_DELETE_WINDOW message a
window manager sends. What is asserted is what a user of a desktop app
needs: the answer streams into the window; closing the window mid-answer or
mid-build, or killing the app, leaves no llama-server (or compiler) running;
two copies with ``--shared`` are served by one llama-server, and Stop makes
that server stop generating.

``LLAMACTL_SCREENSHOTS=DIR`` keeps the screenshots: the README's
``docs/desktop-chat.png`` is ``desktop-chat.png`` of a run with ``LLAMACTL_SCREENSHOTS=docs``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import procman
from procman.daemon.service import DaemonPaths
from tests.conftest import started_here
from tests.integration._x11 import Screen, screen
from tests.integration.conftest import Processes
from tests.integration.test_daemon import client_env, llama_servers_of, make_home, stop_daemon

APP = Path(__file__).resolve().parents[2] / "examples" / "desktop" / "chat.py"
#: a long answer, so that it is still streaming when the test acts on it
LONG = ["--max-tokens", "4000", "--extra", json.dumps({"ignore_eos": True}), "--ctx", "4096"]
READY = 180.0  # seconds: the model loads in ~1 s, but four other jobs may share two cores


@pytest.fixture
def x11() -> Iterator[Screen]:
    yield from screen(dict(os.environ))


@pytest.fixture
def home(tmp_path: Path, demo_model: Path) -> Iterator[Path]:
    home = make_home(tmp_path, demo_model)
    yield home
    stop_daemon(home)


def start_app(
    processes: Processes, x11: Screen, env: dict[str, str], *args: str
) -> tuple[subprocess.Popen[Any], str]:
    proc = processes.popen(
        [sys.executable, APP, *args],
        env={**env, "DISPLAY": x11.display},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, f"llamactl-chat-{proc.pid}"


def wait_ready(x11: Screen, app: str) -> str:
    x11.wait_for(app, ".bar.state", lambda t: t in {"ready", "failed"}, READY, "ready model")
    detail = x11.text(app, ".bar.detail")
    assert x11.text(app, ".bar.state") == "ready", detail
    return detail


def server_pid(detail: str) -> int:
    match = re.search(r"llama-server pid (\d+)", detail)
    assert match, f"the window names no server: {detail!r}"
    return int(match.group(1))


def tokens(status: str) -> int:
    match = re.search(r"(\d+) tokens", status)
    return int(match.group(1)) if match else 0


def keep(shot: Path) -> None:
    if folder := os.environ.get("LLAMACTL_SCREENSHOTS"):
        shutil.copy(shot, Path(folder) / shot.name)


def exited(proc: subprocess.Popen[Any], seconds: float = 90) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=seconds)
    return proc.returncode, out


@pytest.mark.slow
def test_answer_streams_into_the_window_and_closing_mid_answer_stops_the_server(
    home: Path, llama_server: Path, processes: Processes, x11: Screen, tmp_path: Path
) -> None:
    proc, app = start_app(processes, x11, client_env(home, llama_server), *LONG)
    pid = server_pid(wait_ready(x11, app))
    assert [p.pid for p in llama_servers_of(proc.pid, llama_server)] == [pid]
    window = x11.window(app)

    x11.type(app, ".form.entry", "Tell me a long story about a lighthouse keeper.")
    x11.wait_for(app, ".body.transcript", lambda t: "you: Tell me a long story" in t, 60, "echo")
    status = x11.wait_for(app, ".status", lambda t: tokens(t) >= 24, 180, "24 streamed tokens")
    assert status.startswith("answering"), status
    answer = x11.text(app, ".body.transcript").split("demo: ", 1)[1]
    assert len(answer.strip()) > 8, f"the window shows no answer text: {answer!r}"
    assert "tokens/s" in x11.wait_for(app, ".status", lambda t: "tokens/s" in t, 60, "speed")
    keep(x11.screenshot(window, tmp_path / "desktop-chat.png"))

    server = psutil.Process(pid)
    x11.press_close(window)  # mid-answer: ignore_eos and 4000 tokens keep it streaming
    code, out = exited(proc)
    assert code == 0, out
    assert not server.is_running(), "llama-server outlived the window"
    assert "Traceback" not in out, out


@pytest.mark.slow
def test_owned_copies_run_a_server_each_and_a_killed_one_leaves_none(
    home: Path, llama_server: Path, processes: Processes, x11: Screen
) -> None:
    env = client_env(home, llama_server)
    (killed, app1), (other, app2) = (start_app(processes, x11, env) for _ in range(2))
    servers = [psutil.Process(server_pid(wait_ready(x11, app))) for app in (app1, app2)]
    assert servers[0].pid != servers[1].pid, "two owning copies share a server"
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    servers[0].wait(30)  # the parent-death signal ends it; psutil raises if it outlives 30 s
    assert not servers[0].is_running()
    assert servers[1].is_running(), "the other copy's server went with it"
    assert x11.text(app2, ".bar.state") == "ready"
    x11.press_close(x11.window(app2))
    code, out = exited(other)
    assert code == 0, out
    assert not servers[1].is_running()


@pytest.mark.slow
def test_two_shared_copies_use_one_server_and_stop_cancels_upstream(
    home: Path, llama_server: Path, processes: Processes, x11: Screen
) -> None:
    env = client_env(home, llama_server)
    first, app1 = start_app(processes, x11, env, "--shared", *LONG)
    second, app2 = start_app(processes, x11, env, "--shared", *LONG)
    pids = {server_pid(wait_ready(x11, app)) for app in (app1, app2)}
    assert len(pids) == 1, f"two copies, {len(pids)} servers: {pids}"
    socket = DaemonPaths.default(home=home).socket  # the daemon the copies share
    with procman.connect(socket_path=socket, start=False) as client:
        status = client.status()
    assert [p.pid for p in llama_servers_of(status.pid, llama_server)] == list(pids)
    info = status.servers[0]

    story = "Tell me a long story about a lighthouse keeper."
    x11.type(app1, ".form.entry", story)
    x11.wait_for(app1, ".status", lambda t: tokens(t) >= 4, 120, "4 streamed tokens")
    assert generating(info), "llama-server is not generating the answer being shown"
    x11.read(app1, ".form.stop invoke")  # Tk's own driver presses the button
    stopped = x11.wait_for(app1, ".status", lambda t: t.startswith("stopped"), 60, "stop")
    # 4000 tokens with ignore_eos take minutes: a server still busy was never told
    x11.wait_for(app1, ".status", lambda _: not generating(info), 30, "an idle server")
    assert tokens(stopped) < 4000

    for proc, app in ((first, app1), (second, app2)):
        x11.press_close(x11.window(app))
        code, out = exited(proc)
        assert code == 0, out
    # the daemon's server stays for other apps until the daemon is idle
    assert psutil.Process(next(iter(pids))).is_running()


def generating(info: procman.ServerInfo) -> bool:
    request = urllib.request.Request(  # noqa: S310 - the server's loopback URL
        f"{info.url}/slots", headers={"Authorization": f"Bearer {info.api_key}"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
        slots = json.load(resp)
    return any(slot["is_processing"] for slot in slots)


@pytest.mark.slow
def test_first_run_shows_the_compile_and_closing_cancels_it(
    tmp_path: Path, demo_model: Path, processes: Processes, x11: Screen
) -> None:
    """No llama-server anywhere: the window shows the build, and closing it ends the build."""
    home = make_home(tmp_path, demo_model)
    from buildtools import paths
    from buildtools.fetch import fetch
    from buildtools.source import PINNED

    tarball = fetch(PINNED.tarball, paths.home() / "downloads")  # the shared, verified copy
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p)
    env = {**client_env(home), "LLAMACTL_SOURCE": str(tarball), "PATH": path}
    env.pop("LLAMACTL_SERVER", None)
    assert shutil.which("llama-server", path=path) is None, "a llama-server is on PATH"
    proc, app = start_app(processes, x11, env)

    detail = x11.wait_for(
        app, ".bar.detail", lambda t: re.search(r"compiling llama-server \d+%", t), 900, "compile"
    )
    assert x11.text(app, ".bar.state") == "preparing", detail
    value = float(x11.read(app, ".bar.progress cget -value"))
    assert 0 < value < 100, value
    window = x11.window(app)
    keep(x11.screenshot(window, tmp_path / "desktop-first-run.png"))
    x11.press_close(window)
    code, out = exited(proc)
    assert code == 0, out
    left = {pid: what for pid, what in started_here().items() if str(home) in what}
    assert not left, f"the build outlived the window: {left}"
