"""The library as a desktop app embeds it: the blocking facade, its events, its ownership.

A host that owns its servers leaves none behind when it exits, normally or
SIGKILLed (PDEATHSIG, from the facade's long-lived loop thread). Each test
bounds its waits and kills what it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

import procman
from procman.events import Event, State
from tests.integration.conftest import Processes


def chat(base_url: str, key: str | None, text: str = "Say hello.") -> str:
    body = json.dumps(
        {"messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0}
    ).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(  # noqa: S310 - loopback
        f"{base_url}/chat/completions", body, headers
    )
    with urllib.request.urlopen(request, timeout=60) as resp:  # noqa: S310 - loopback
        answer = json.load(resp)
    return str(answer["choices"][0]["message"]["content"])


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_import_is_light_and_quiet() -> None:
    code = (
        "import json, sys, time, logging; t = time.perf_counter(); import procman;"
        " ms = (time.perf_counter() - t) * 1000;"
        " heavy = sorted({'typer', 'rich', 'click', 'aiohttp', 'gguf'} & set(sys.modules));"
        " print(json.dumps({'heavy': heavy, 'handlers': len(logging.getLogger().handlers),"
        " 'ms': ms}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    report = json.loads(out.stdout)
    assert report["heavy"] == []
    assert report["handlers"] == 0
    assert out.stderr == ""
    print(f"\nimport procman: {report['ms']:.1f} ms")


def test_a_package_of_procman_imports_none_of_its_modules() -> None:
    # the early start imports procman.process._sockets at launch, and `import procman`
    # must stay cheap: no package's __init__ may bring a module (or aiohttp) with it
    code = (
        "import sys; import procman.process, procman.router, procman.memory, procman.models,"
        " procman.daemon; print(sorted(m for m in sys.modules if m.startswith('procman.')"
        " and m.count('.') > 1 or m in ('aiohttp', 'asyncio', 'typing')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_blocking_supervisor_serves_chats_reports_and_cleans_up(
    llama_server: Path, demo_model: Path, tmp_path: Path
) -> None:
    events: list[Event] = []
    threads: set[str] = set()

    def on_event(event: Event) -> None:
        threads.add(threading.current_thread().name)
        events.append(event)

    with procman.Supervisor() as sup:
        sup.on_event(on_event)
        started = time.monotonic()
        server = sup.serve(
            str(demo_model),
            name="lib",
            ctx=512,
            parallel=1,
            binary=str(llama_server),
            startup_timeout=90,
            log_dir=str(tmp_path),
        )
        print(f"\nsync serve -> ready in {time.monotonic() - started:.2f} s")
        assert server.state is State.READY
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        assert server.api_key and server.api_key not in repr(server)
        assert chat(server.base_url, server.api_key)
        with pytest.raises(urllib.error.HTTPError) as refused:  # another local user: no key
            chat(server.base_url, None)
        assert refused.value.code == 401
        again = sup.serve(str(demo_model), name="lib", binary=str(llama_server))
        assert again.pid == server.pid  # the running server is reused
        assert [s.name for s in sup.status()] == ["lib"]
        assert server.pid is not None
        pid = server.pid
    assert wait_gone(pid, 15)
    states = [e.state for e in events if not e.is_note]  # notes: admitted
    # in order: spawned, maybe seen loading (a fast load can skip it), then ready
    assert State.READY in states, states
    assert states[: states.index(State.READY) + 1] in (
        [State.STARTING, State.LOADING, State.READY],
        [State.STARTING, State.READY],
    ), states
    assert states[-1] is State.STOPPED
    assert threads == {"procman-supervisor"}  # callbacks run on the loop thread, as documented


async def test_async_core_events_as_an_iterator(
    llama_server: Path, demo_model: Path, tmp_path: Path
) -> None:
    spec = procman.ServeRequest(
        model=str(demo_model),
        name="core",
        ctx=512,
        binary=str(llama_server),
        log_dir=str(tmp_path),
    ).to_spec()
    async with procman.AsyncSupervisor() as supervisor, supervisor.bus.listen() as events:
        await supervisor.serve(spec)
        seen = []
        async for event in events:
            seen.append(event.state)
            if event.state is State.READY:
                break
    assert seen[-1] is State.READY


@pytest.mark.slow
def test_sigkilled_host_leaves_no_server_behind(
    llama_server: Path, demo_model: Path, tmp_path: Path, processes: Processes
) -> None:
    code = f"""
import sys, procman
sup = procman.Supervisor()
server = sup.serve({str(demo_model)!r}, ctx=512, binary={str(llama_server)!r},
                   startup_timeout=90, log_dir={str(tmp_path)!r})
print(server.pid, flush=True)
sys.stdin.read()
"""
    host = processes.popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert host.stdout is not None
    pid = int(host.stdout.readline())
    assert psutil.Process(pid).ppid() == host.pid
    os.kill(host.pid, signal.SIGKILL)
    host.wait(10)
    assert wait_gone(pid, 10), "llama-server outlived its SIGKILLed host"
