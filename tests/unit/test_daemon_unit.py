"""The daemon's protocol, locks, idle clock and shutdown, in-process (no child processes)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import procman
from procman._units import duration_option
from procman.daemon._request import ServeRequest, ServerInfo
from procman.daemon.client import DaemonClient
from procman.daemon.service import Daemon, DaemonPaths, daemon_alive, open_lock, try_lock
from procman.events import State


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("300", 300.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("500ms", 0.5), ("1.5 m", 90)],
)
def test_durations(text: str, seconds: float) -> None:
    assert duration_option(text, "--idle-timeout") == seconds


def test_bad_duration() -> None:
    with pytest.raises(procman.ConfigError, match="--idle-timeout: expected a duration"):
        duration_option("soon", "--idle-timeout")


def test_serve_request_round_trips_and_rejects_unknown_options() -> None:
    request = ServeRequest(model="demo", ctx=2048, args=("--flash-attn", "on"), gpu_layers="all")
    assert ServeRequest.from_json(json.loads(json.dumps(request.to_json()))) == request
    with pytest.raises(procman.ConfigError, match="unknown serve option"):
        ServeRequest.from_json({"model": "demo", "ctx_size": 1})
    with pytest.raises(procman.ConfigError, match="model"):
        ServeRequest.from_json({"ctx": 1})


def test_server_info_round_trips_with_its_base_url() -> None:
    info = ServerInfo(name="demo", state=State.READY, pid=1, port=8, url="http://127.0.0.1:8")
    assert ServerInfo.from_json(json.loads(json.dumps(info.to_json()))) == info
    assert info.base_url == "http://127.0.0.1:8/v1"


def test_liveness_is_the_lock_not_the_files(tmp_path: Path) -> None:
    paths = DaemonPaths.default(home=tmp_path)
    paths.prepare()
    assert oct(paths.root.stat().st_mode & 0o777) == "0o700"
    paths.pid_file.write_text("12345\n")  # stale files of a crashed daemon
    paths.socket.touch()
    assert not daemon_alive(paths)
    fd = open_lock(paths.lock)
    try:
        assert try_lock(fd)
        assert daemon_alive(paths)
    finally:
        os.close(fd)
    assert not daemon_alive(paths)


def test_too_long_socket_path_is_a_config_error(tmp_path: Path) -> None:
    paths = DaemonPaths.default(tmp_path / ("x" * 120), home=tmp_path)
    with pytest.raises(procman.ConfigError, match="too long"):
        paths.prepare()


def test_no_daemon_and_no_start_is_a_daemon_error(tmp_path: Path) -> None:
    client = DaemonClient(
        DaemonPaths.default(home=tmp_path), idle_timeout=1, start=False, timeout=1
    )
    with pytest.raises(procman.DaemonError, match="no daemon"):
        client.status()


# -- a daemon in this process ----------------------------------------------------------------
@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Daemon, asyncio.Task[None]]]:
    paths = DaemonPaths.default(home=tmp_path)
    paths.prepare()
    lock = open_lock(paths.lock)
    assert try_lock(lock)
    daemon = Daemon(paths, idle_timeout=60)
    task = asyncio.create_task(daemon.run(lock))
    listening = asyncio.ensure_future(daemon.listening.wait())
    await asyncio.wait({task, listening}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert daemon.listening.is_set()
    try:
        yield daemon, task
    finally:
        daemon._stop.set()
        await asyncio.wait_for(task, 10)
        os.close(lock)


async def exchange(daemon: Daemon, *lines: bytes) -> list[dict[str, object]]:
    reader, writer = await asyncio.open_unix_connection(str(daemon.paths.socket))
    replies = []
    try:
        for line in lines:
            writer.write(line + b"\n")
            replies.append(json.loads(await asyncio.wait_for(reader.readline(), 10)))
    finally:
        writer.close()
    return replies


async def test_status_and_errors_over_the_socket(
    running: tuple[Daemon, asyncio.Task[None]],
) -> None:
    daemon, _ = running
    assert oct(daemon.paths.socket.stat().st_mode & 0o777) == "0o600"
    status, unknown, garbage, bad = await exchange(
        daemon, b'{"op": "status"}', b'{"op": "dance"}', b"not json", b'{"op": "serve"}'
    )
    data = {"pid": os.getpid(), "clients": 1, "servers": [], "http": None}  # no --http
    assert status == {"ok": True, "data": data}
    assert unknown["ok"] is False and "unknown op" in str(unknown["error"])
    assert garbage["ok"] is False and "not JSON" in str(garbage["error"])
    assert bad["ok"] is False and "model" in str(bad["error"])


async def test_blocking_client_gets_status_and_typed_errors(
    running: tuple[Daemon, asyncio.Task[None]],
) -> None:
    daemon, _ = running
    client = DaemonClient(daemon.paths, idle_timeout=1, start=False, timeout=5)
    try:
        status = await asyncio.to_thread(client.status)
        assert status.pid == os.getpid()
        assert status.clients == 1
        with pytest.raises(procman.ConfigError, match="unknown op"):
            await asyncio.to_thread(client.request, "dance")
    finally:
        client.close()


async def test_a_shutting_down_daemon_tells_clients_to_retry(
    running: tuple[Daemon, asyncio.Task[None]],
) -> None:
    daemon, _ = running
    daemon._shutting_down = True
    (reply,) = await exchange(daemon, b'{"op": "serve", "model": "demo"}')
    assert reply["ok"] is False
    assert isinstance(reply["error"], dict) and reply["error"]["retry"] is True


async def test_stop_closes_unlinks_and_returns(
    running: tuple[Daemon, asyncio.Task[None]],
) -> None:
    daemon, task = running
    (reply,) = await exchange(daemon, b'{"op": "stop"}')
    assert reply == {"ok": True, "data": None}
    await asyncio.wait_for(asyncio.shield(task), 10)
    assert not daemon.paths.socket.exists()
    assert not daemon.paths.pid_file.exists()


async def test_idle_daemon_exits(tmp_path: Path) -> None:
    paths = DaemonPaths.default(home=tmp_path)
    paths.prepare()
    daemon = Daemon(paths, idle_timeout=0.2)
    await asyncio.wait_for(daemon.run(-1), 10)
    assert not paths.socket.exists()


async def test_requests_to_the_daemons_router_keep_it_from_idling(tmp_path: Path) -> None:
    from procman.spec import ServerSpec

    paths = DaemonPaths.default(home=tmp_path)
    plain = Daemon(paths, idle_timeout=60)
    routed = Daemon(paths, idle_timeout=60, http_port=0)  # nothing binds before run()
    spec = ServerSpec(name="m", model=tmp_path / "m.gguf", binary=tmp_path / "llama-server")
    for daemon in (plain, routed):
        daemon.supervisor.add(spec, validate=False, on_demand=True)
        daemon._last_activity -= 100  # the last client left long ago
        assert daemon.supervisor.last_request() == (0.0, False)
    left = routed._idle_left()
    assert left is not None and left <= -39  # no request yet: idle like any daemon
    async with routed.supervisor.using("m"), plain.supervisor.using("m"):
        assert routed.supervisor.last_request()[1]  # one in flight
        assert routed._idle_left() == 60  # looked at again later, not exited
        left = plain._idle_left()
        assert left is not None and left <= -39  # without a router, requests are not its
    ended, in_flight = routed.supervisor.last_request()
    assert not in_flight and ended > 0
    left = routed._idle_left()
    assert left is not None and 59 < left <= 60  # idle counts from the request's end
