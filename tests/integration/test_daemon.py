"""The shared daemon for real: client processes, the start race, idle exit, crash recovery.

The start race is made to happen: two clients both find no daemon before
either may go on, and exactly one of them launches it.

Clients are real ``python -c`` processes calling ``procman.connect()``; each
test has its own ``LLAMACTL_HOME`` (the demo model linked in), bounds every
wait, and stops the daemons it caused.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from procman.daemon.service import DaemonPaths, daemon_alive
from tests.integration.conftest import Processes

CLIENT_SERVE = """
import json, sys, procman
client = procman.connect(idle_timeout=30, timeout=60)
server = client.serve("demo", ctx=512, parallel=1, startup_timeout=90)
status = client.status()
print(json.dumps({"server": server.pid, "url": server.base_url, "daemon": status.pid}), flush=True)
sys.stdin.read()  # stay attached until the test closes our stdin
"""

# A client that reports what it did: whether its first look found no daemon, and how
# many daemons it launched. After that first look it waits for the test's word, so the
# test lets two clients on only once both have found no daemon: a real contention.
CLIENT_RACE = """
import json, sys, procman
from procman.daemon.client import DaemonClient

look, launch = DaemonClient._try_connect, DaemonClient._launch
did = {"found_none": None, "launched": 0}

def first_look_then_wait(self):
    found = look(self)
    if did["found_none"] is None:
        did["found_none"] = not found
        print("looked", flush=True)
        sys.stdin.readline()
    return found

def counted_launch(self, deadline):
    did["launched"] += 1
    return launch(self, deadline)

DaemonClient._try_connect = first_look_then_wait
DaemonClient._launch = counted_launch
did["daemon"] = procman.connect(idle_timeout=2, timeout=30).status().pid
print(json.dumps(did), flush=True)
"""


def make_home(root: Path, demo_model: Path | None = None) -> Path:
    home = root / "h"
    (home / "models").mkdir(parents=True)
    if demo_model is not None:
        for item in demo_model.parent.iterdir():  # the model and its checksum marker
            if item.name.endswith((".gguf", ".sha256")):
                (home / "models" / item.name).symlink_to(item)
    return home


def client_env(home: Path, binary: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "LLAMACTL_HOME": str(home), "LLAMACTL_LOG": "WARNING"}
    if binary is not None:
        env["LLAMACTL_SERVER"] = str(binary)
    return env


def daemon_pid(home: Path) -> int | None:
    pid_file = DaemonPaths.default(home=home).pid_file
    try:
        return int(pid_file.read_text())
    except (OSError, ValueError):
        return None


def stop_daemon(home: Path, timeout: float = 20) -> None:
    """Ask the daemon to exit (SIGKILL if it does not) and wait until its lock is free."""
    paths = DaemonPaths.default(home=home)
    pid = daemon_pid(home)
    if pid is not None and psutil.pid_exists(pid):
        os.kill(pid, signal.SIGTERM)
        try:
            psutil.Process(pid).wait(timeout)
        except psutil.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + timeout
    while daemon_alive(paths):
        assert time.monotonic() < deadline, "daemon lock still held"
        time.sleep(0.05)


def llama_servers_of(pid: int, binary: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["exe", "ppid"]):
        exe = proc.info["exe"]
        if exe and Path(exe).resolve() == binary.resolve() and proc.info["ppid"] == pid:
            found.append(proc)
    return found


@pytest.fixture
def home(tmp_path: Path, demo_model: Path) -> Iterator[Path]:
    home = make_home(tmp_path, demo_model)
    yield home
    stop_daemon(home)


def kill_all(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


# -- many clients, one server --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("clients", [2, 8])
def test_clients_asking_at_once_share_one_llama_server(
    clients: int, home: Path, llama_server: Path, processes: Processes
) -> None:
    env = client_env(home, llama_server)
    procs = [
        processes.popen(
            [sys.executable, "-c", CLIENT_SERVE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(clients)
    ]
    try:
        answers = []
        deadline = time.monotonic() + 120
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # each client prints one line once served
            assert line, proc.stderr.read() if proc.stderr else ""
            answers.append(json.loads(line))
            assert time.monotonic() < deadline
        daemons = {a["daemon"] for a in answers}
        servers = {a["server"] for a in answers}
        assert len(daemons) == 1, answers
        assert len(servers) == 1, answers
        daemon = daemons.pop()
        running = llama_servers_of(daemon, llama_server)
        assert [p.pid for p in running] == list(servers), running
        status = json.loads(
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import procman, json; s = procman.connect(start=False)"
                    ".status(); print(json.dumps({'clients': s.clients}))",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
        )
        assert status["clients"] == clients + 1
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
        kill_all(procs)


# -- the start race ------------------------------------------------------------------------------
def race_once(home: Path, processes: Processes) -> list[dict[str, Any]]:
    """Two clients that both found no daemon, let on together; what each reports."""
    procs = [
        processes.popen(
            [sys.executable, "-c", CLIENT_RACE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=client_env(home),
        )
        for _ in range(2)
    ]
    for proc in procs:  # each has looked for a daemon, found none, and waits
        assert proc.stdout is not None
        assert proc.stdout.readline() == "looked\n", proc.communicate(timeout=30)
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        reports.append(json.loads(out.splitlines()[-1]))
    return reports


@pytest.mark.slow
def test_two_clients_racing_to_start_end_with_one_daemon(
    tmp_path: Path, processes: Processes
) -> None:
    for attempt in range(20):
        home = make_home(tmp_path / f"r{attempt}")
        try:
            reports = race_once(home, processes)
            daemons = [
                p
                for p in psutil.process_iter(["cmdline"])
                if "procman.daemon" in " ".join(p.info["cmdline"] or ())
                and str(home) in " ".join(p.info["cmdline"] or ())
            ]
        finally:
            stop_daemon(home)
        assert all(r["found_none"] for r in reports), reports  # both contended
        assert sum(r["launched"] for r in reports) == 1, reports  # one launched, one waited
        assert len({r["daemon"] for r in reports}) == 1, reports  # and both use it
        assert [d.pid for d in daemons] == [reports[0]["daemon"]], (reports, daemons)


# -- idle exit, and staying up while attached ----------------------------------------------------
def test_daemon_exits_when_idle_but_not_while_a_client_is_attached(
    tmp_path: Path, processes: Processes
) -> None:
    home = make_home(tmp_path)
    env = client_env(home)
    attached = processes.popen(
        [
            sys.executable,
            "-c",
            "import sys, procman; c = procman.connect(idle_timeout=1);"
            " print(c.status().pid, flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert attached.stdout is not None
        pid = int(attached.stdout.readline())
        paths = DaemonPaths.default(home=home)
        assert paths.socket.exists()
        assert oct(paths.socket.stat().st_mode & 0o777) == "0o600"
        assert oct(paths.root.stat().st_mode & 0o777) == "0o700"
        time.sleep(2.5)  # longer than the idle timeout: the attached client keeps it up
        assert psutil.pid_exists(pid)
        assert attached.stdin is not None
        attached.stdin.close()
        attached.wait(10)
        started = time.monotonic()
        while paths.socket.exists():  # the daemon unlinks it as it shuts down
            assert time.monotonic() - started < 15, "daemon did not exit when idle"
            time.sleep(0.02)
        idle_exit = time.monotonic() - started
        print(f"\nidle exit {idle_exit:.2f} s after the last client left (timeout 1 s)")
        psutil.Process(pid).wait(15)
        assert not daemon_alive(paths)
    finally:
        kill_all([attached])
        stop_daemon(home)


# -- crash recovery --------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkilled_daemon_is_replaced_and_its_server_dies(home: Path, llama_server: Path) -> None:
    env = client_env(home, llama_server)
    code = (
        "import json, procman; c = procman.connect(idle_timeout=30, timeout=60);"
        " s = c.serve('demo', ctx=512, startup_timeout=90);"
        " print(json.dumps({'daemon': c.status().pid, 'server': s.pid}))"
    )
    first = json.loads(
        subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    )
    time.sleep(0.5)  # the first client has gone: its server stays up for others until idle
    assert psutil.pid_exists(first["server"])
    os.kill(first["daemon"], signal.SIGKILL)
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(first["daemon"]).wait(10)
    paths = DaemonPaths.default(home=home)
    assert paths.socket.exists() and paths.pid_file.exists()  # stale files are left behind
    deadline = time.monotonic() + 10
    while psutil.pid_exists(first["server"]):  # PDEATHSIG: the server died with its daemon
        assert time.monotonic() < deadline, "llama-server outlived its SIGKILLed daemon"
        time.sleep(0.05)
    second = json.loads(
        subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    )
    assert second["daemon"] != first["daemon"]
    assert psutil.pid_exists(second["server"])


def test_client_of_a_daemon_that_exits_moves_to_a_new_one(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    env = client_env(home)
    code = (
        "import os, time, procman\n"
        "a = procman.connect(idle_timeout=5)\n"
        "b = procman.connect(idle_timeout=5)\n"
        "old = a.status().pid\n"
        "b.stop_daemon()\n"
        "while True:\n"
        "    try: os.kill(old, 0)\n"
        "    except ProcessLookupError: break\n"
        "    time.sleep(0.02)\n"
        "print(old, a.status().pid)\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        old, new = out.split()
        assert old != new
    finally:
        stop_daemon(home)


def test_serve_daemon_prints_a_url_the_shared_server_answers(
    home: Path, llama_server: Path
) -> None:
    """`llamactl serve --daemon` returns once the daemon's server is ready; a second
    call gets the same server; the server outlives the command."""
    env = client_env(home, llama_server)
    cli = [sys.executable, "-m", "procman.cli", "serve", "--daemon"]
    try:
        first = subprocess.run(
            cli, capture_output=True, text=True, env=env, timeout=120, check=False
        )
        assert first.returncode == 0, first.stderr
        url, key = first.stdout.split()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        second = subprocess.run(
            cli, capture_output=True, text=True, env=env, timeout=120, check=False
        )
        assert second.stdout.split() == [url, key], "a second client shares the running server"
        import urllib.error
        import urllib.request

        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})

        def ask(*auth: tuple[str, str]) -> dict[str, Any]:
            request = urllib.request.Request(  # noqa: S310 - loopback URL
                f"{url}/chat/completions",
                data=body.encode(),
                headers={"Content-Type": "application/json", **dict(auth)},
            )
            with urllib.request.urlopen(request, timeout=60) as reply:  # noqa: S310 - loopback
                answer: dict[str, Any] = json.loads(reply.read())
                return answer

        assert ask(("Authorization", f"Bearer {key}"))["usage"]["completion_tokens"] > 0
        with pytest.raises(urllib.error.HTTPError) as refused:  # another local user: no key
            ask()
        assert refused.value.code == 401
    finally:
        stop_daemon(home)


def test_the_daemon_serves_a_keyed_router_and_the_dashboard_on_loopback(
    home: Path, llama_server: Path, processes: Processes
) -> None:
    """`--http`: the router over the daemon's supervisor, on 127.0.0.1, its random key in
    http.json (0600); the router's Host, Origin and key rules apply; gone when it stops."""
    import urllib.error
    import urllib.request

    env = client_env(home, llama_server)
    argv = [sys.executable, "-m", "procman.daemon", "--http", "0", "--idle-timeout", "120"]
    processes.popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    paths = DaemonPaths.default(home=home)
    deadline = time.monotonic() + 60
    while not paths.http_info.exists():
        assert time.monotonic() < deadline, "no http.json"
        time.sleep(0.05)
    assert paths.http_info.stat().st_mode & 0o777 == 0o600
    info = json.loads(paths.http_info.read_text())
    base, key = info["url"].removesuffix("/v1"), info["api_key"]
    assert base.startswith("http://127.0.0.1:") and info["ui"] == f"{base}/ui" and len(key) > 30
    served = subprocess.run(  # a program asks the daemon for the demo model, as programs do
        [sys.executable, "-m", "procman.cli", "serve", "--daemon"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert served.returncode == 0, served.stderr

    def call(path: str, body: Any = None, **headers: str) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{base}{path}", data=data, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:  # noqa: S310 - loopback
                text = reply.read().decode()
                return reply.status, json.loads(text) if text.startswith("{") else text
        except urllib.error.HTTPError as exc:
            return exc.code, None

    auth = {"Authorization": f"Bearer {key}"}
    page_status, page = call("/ui")
    assert page_status == 200 and "<html" in page.lower()  # the page itself needs no key
    assert call("/admin/status")[0] == 401
    status, rows = call("/admin/status", **auth)
    assert status == 200 and [m["name"] for m in rows["models"]] == ["demo"]
    chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, answer = call(
        "/v1/chat/completions", chat, **auth, **{"Content-Type": "application/json"}
    )
    assert status == 200 and answer["usage"]["completion_tokens"] > 0
    assert call("/v1/models", **auth, Host="evil.example")[0] == 403
    # a web page (cross-site, no key) cannot drive it; the model still answers
    assert call("/admin/unload/demo", {}, Origin="http://evil.example")[0] == 403
    assert call("/admin/status", **auth)[1]["models"][0]["state"] == "ready"
    printed = subprocess.run(
        [sys.executable, "-m", "procman.cli", "daemon", "--status"],
        capture_output=True, text=True, env={**env, "COLUMNS": "300"}, timeout=60, check=False,
    )  # fmt: skip
    assert f"dashboard {base}/ui" in printed.stdout + printed.stderr, printed.stderr
    stop_daemon(home)
    assert not paths.http_info.exists()
