"""The dashboard's Python side, with a supervisor whose servers never start: the page's
files and the endpoints it reads, under the router's Host, Origin and key rules."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from procman.events import State
from procman.memory.budget import MachineMemory
from procman.router import Router, RouterSettings
from procman.router import _ui as ui
from procman.router._guard import PAGE_PATHS
from procman.router.listen import bind_listener
from procman.spec import ServerSpec
from procman.supervisor import AsyncSupervisor

KEY = "ui-unit-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GiB = 1 << 30
MANIFEST = {
    "key": "abc123",
    "plan": {
        "backend": "cpu",
        "cmake_defines": {"GGML_NATIVE": "OFF"},
        "reasons": {"GGML_NATIVE": "explicit instruction sets"},
    },
}


def built(tmp_path: Path) -> Path:
    """A llama-server inside a build folder as the cache lays it out."""
    binary = tmp_path / "builds" / "abc123" / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    (binary.parent.parent / "manifest.json").write_text(json.dumps(MANIFEST))
    return binary


@pytest.fixture
async def router(tmp_path: Path) -> AsyncIterator[tuple[AsyncSupervisor, str]]:
    machine = MachineMemory(total_bytes=16 * GiB, available_bytes=12 * GiB)
    supervisor = AsyncSupervisor(memory_budget="8GiB", machine=machine)
    binary = built(tmp_path)
    for name in ("alpha", "beta"):
        supervisor.add(ServerSpec(name=name, model=tmp_path / "m.gguf", binary=binary))
    router = Router(supervisor, RouterSettings(api_key=KEY))
    await router.start(bind_listener("127.0.0.1", 0))
    assert router.address is not None
    try:
        yield supervisor, f"http://127.0.0.1:{router.address[1]}"
    finally:
        await router.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def test_the_guard_lets_exactly_the_page_files_through_without_a_key() -> None:
    assert set(ui.PAGE_FILES) == PAGE_PATHS
    for name, _ in ui.PAGE_FILES.values():
        assert (Path(ui.__file__).with_name("ui") / name).is_file(), name


def test_the_page_loads_nothing_from_elsewhere() -> None:
    folder = Path(ui.__file__).with_name("ui")
    for file in folder.iterdir():
        text = file.read_text()
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), file.name
        assert not re.search(r"""(fetch|import)\(\s*["'`]https?:""", text), file.name


async def test_the_page_is_served_without_a_key_but_not_to_others(
    router: tuple[AsyncSupervisor, str], http: aiohttp.ClientSession
) -> None:
    _, base = router
    async with http.get(f"{base}/ui") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/html")
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert "/ui/app.js" in await resp.text()
    async with http.get(f"{base}/ui/app.js") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/javascript")
    async with http.get(f"{base}/ui/secret.txt") as resp:
        assert resp.status == 401  # not a page file: the key rules apply as anywhere
    for headers in (
        {"Host": "evil.example"},  # DNS rebinding
        {"Sec-Fetch-Site": "cross-site"},  # a link or frame from another site
        {"Origin": "http://evil.example"},
    ):
        async with http.get(f"{base}/ui", headers=headers) as resp:
            assert resp.status == 403, headers


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/status?follow=1"),
        ("GET", "/admin/memory"),
        ("GET", "/admin/machine"),
        ("POST", "/admin/load/alpha"),
        ("POST", "/admin/unload/alpha"),
    ],
)
async def test_what_the_page_reads_and_does_needs_the_key_host_and_origin(
    router: tuple[AsyncSupervisor, str], http: aiohttp.ClientSession, method: str, path: str
) -> None:
    _, base = router
    async with http.request(method, f"{base}{path}") as resp:
        assert resp.status == 401
    async with http.request(
        method, f"{base}{path}", headers={**AUTH, "Host": "evil.example"}
    ) as resp:
        assert resp.status == 403
    foreign = {"Origin": "http://evil.example"}
    async with http.request(method, f"{base}{path}", headers=foreign) as resp:
        assert resp.status == 403  # a cross-site form or fetch changes nothing


async def test_memory_shows_the_budget_and_what_is_held(
    router: tuple[AsyncSupervisor, str], http: aiohttp.ClientSession
) -> None:
    _, base = router
    async with http.get(f"{base}/admin/memory", headers=AUTH) as resp:
        assert resp.status == 200
        memory = await resp.json()
    assert memory["budget"]["memory_bytes"] == 8 * GiB
    assert memory["machine"]["total_bytes"] == 16 * GiB
    assert memory["held"] == {}
    assert memory["refusals"] == 0


async def test_machine_names_each_models_build(
    router: tuple[AsyncSupervisor, str],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, base = router
    probes: list[int] = []

    def machine() -> dict[str, object]:
        probes.append(1)
        return {"cpu": {"arch": "x86_64"}}

    monkeypatch.setattr(ui, "_machine", machine)
    for _ in range(2):
        async with http.get(f"{base}/admin/machine", headers=AUTH) as resp:
            assert resp.status == 200
            found = await resp.json()
    assert probes == [1]  # probed once
    assert found["machine"] == {"cpu": {"arch": "x86_64"}}
    build = found["builds"]["alpha"]
    assert build["key"] == "abc123" and build["backend"] == "cpu"
    assert build["reasons"]["GGML_NATIVE"] == "explicit instruction sets"


def test_a_binary_outside_the_cache_has_no_build(tmp_path: Path) -> None:
    assert ui.build_of(tmp_path / "llama-server") is None
    (tmp_path / "manifest.json").write_text("not json")
    assert ui.build_of(tmp_path / "bin" / "llama-server") is None


async def test_status_follows_as_events_and_soon_after_a_change(
    router: tuple[AsyncSupervisor, str], http: aiohttp.ClientSession
) -> None:
    supervisor, base = router
    async with http.get(f"{base}/admin/status?follow=1&interval=60", headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = json.loads((await resp.content.readline()).decode().removeprefix("data: "))
        assert [m["name"] for m in first["models"]] == ["alpha", "beta"]
        assert first["models"][0]["state"] == "stopped"
        assert first["memory"]["budget"]["memory_bytes"] == 8 * GiB
        assert await resp.content.readline() == b"\n"
        # an event wakes the stream long before the 60 s interval
        supervisor.bus.emit("alpha", State.STOPPED, State.STOPPED, "noted", kind="refused")
        async with asyncio.timeout(5):
            line = await resp.content.readline()
        second = json.loads(line.decode().removeprefix("data: "))
        assert second["models"][0]["refused"] == "noted"
        assert second["time"] >= first["time"]


@pytest.mark.parametrize("interval", ["abc", "0", "1000"])
async def test_a_bad_interval_is_400(
    router: tuple[AsyncSupervisor, str], http: aiohttp.ClientSession, interval: str
) -> None:
    _, base = router
    url = f"{base}/admin/status?follow=1&interval={interval}"
    async with http.get(url, headers=AUTH) as resp:
        assert resp.status == 400
        assert "interval" in (await resp.json())["error"]["message"]
