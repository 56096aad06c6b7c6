"""RPC workers without processes: endpoints, the protocol probe against in-process fakes,
the split, the config's [workers] tables, and what a worker's output is read for."""

from __future__ import annotations

import asyncio
import socket
import struct
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from procman.config import parse_config
from procman.distributed.rpc import PROTOCOL, parse_endpoint, parse_endpoints, probe
from procman.distributed.worker import WorkerSpec, WorkerStatus, _Lines
from procman.errors import ConfigError
from procman.events import State
from procman.memory.estimate import estimate
from procman.memory.split import layer_devices, plan_split
from procman.process.endpoint import Endpoint
from procman.spec import ServerSpec
from tests.unit.test_estimate import SMOLLM2

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
GiB = 1024**3


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.2:50052", ("127.0.0.2", 50052)), ("10.0.0.1", ("10.0.0.1", 50052)),
     (" 192.168.1.20:6000 ", ("192.168.1.20", 6000))],
)  # fmt: skip
def test_endpoints_parse(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [("gpu-box:50052", "not an IPv4 address"), ("[::1]:50052", "not an IPv4 address"),
     ("127.0.0.1:0", "port must be"), ("127.0.0.1:70000", "port must be"),
     ("127.0.0.1:5o", "port must be"), ("127.0.0.1:²", "port must be")],
)  # fmt: skip
def test_bad_endpoints_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_endpoint(text)


def test_an_endpoint_listed_twice_is_refused() -> None:
    assert parse_endpoints("127.0.0.2:1,127.0.0.3:1") == ("127.0.0.2:1", "127.0.0.3:1")
    with pytest.raises(ConfigError, match="twice"):
        parse_endpoints("127.0.0.2,127.0.0.2:50052")


# -- the probe against fakes that speak (or not) ggml's RPC protocol -------------------------
async def _read_command(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    cmd, size = struct.unpack("<BQ", await reader.readexactly(9))
    return cmd, await reader.readexactly(size)


def _answer(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(struct.pack("<Q", len(payload)) + payload)


def worker_speaking(version: tuple[int, int, int], memory: list[tuple[int, int]]) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cmd, payload = await _read_command(reader)
        assert (cmd, len(payload)) == (14, 24), "HELLO with 24 bytes of capabilities"
        _answer(writer, bytes([*version, 0]) + bytes(24))
        while True:
            try:
                cmd, payload = await _read_command(reader)
            except asyncio.IncompleteReadError:
                break
            if cmd == 15:
                _answer(writer, struct.pack("<I", len(memory)))
            elif cmd == 11:
                (index,) = struct.unpack("<I", payload)
                _answer(writer, struct.pack("<QQ", *memory[index]))
        writer.close()

    return handle


async def never_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # like a worker with a leader connected: the probe waits in vain


async def http_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(10)
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    writer.close()


@pytest.fixture
async def fake() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_a_worker_reports_its_protocol_and_each_device(
    fake: Callable[..., Awaitable[str]],
) -> None:
    endpoint = await fake(worker_speaking(PROTOCOL, [(3 * GiB, 4 * GiB), (1 * GiB, 8 * GiB)]))
    found = await probe(endpoint)
    assert found.usable and found.error == ""
    assert found.protocol == PROTOCOL
    assert [(d.free, d.total) for d in found.devices] == [(3 * GiB, 4 * GiB), (GiB, 8 * GiB)]
    assert found.free == 4 * GiB and found.total == 12 * GiB


async def test_another_protocol_version_names_both(fake: Callable[..., Awaitable[str]]) -> None:
    endpoint = await fake(worker_speaking((8, 1, 0), [(GiB, GiB)]))
    found = await probe(endpoint)
    assert found.answered and not found.usable
    assert "8.1.0" in found.error and "7.0.0" in found.error


async def test_a_newer_minor_version_is_refused_as_llama_server_would(
    fake: Callable[..., Awaitable[str]],
) -> None:
    found = await probe(await fake(worker_speaking((7, 1, 0), [])))
    assert not found.usable and "7.1.0" in found.error


async def test_a_worker_that_never_answers_is_busy_or_silent(
    fake: Callable[..., Awaitable[str]],
) -> None:
    found = await probe(await fake(never_answering), timeout=0.2)
    assert found.reachable and not found.answered and not found.usable
    assert "busy" in found.error and "silent" in found.error


async def test_a_closed_port_is_unreachable() -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        found = await probe(f"127.0.0.1:{closed.getsockname()[1]}", timeout=0.5)
    assert not found.reachable and "unreachable" in found.error


async def test_something_else_on_the_port_is_not_taken_for_a_worker(
    fake: Callable[..., Awaitable[str]],
) -> None:
    found = await probe(await fake(http_server))
    assert found.reachable and not found.usable
    assert "not a ggml-rpc-server" in found.error


# -- the split -----------------------------------------------------------------------------
def test_layers_are_placed_as_llama_cpp_places_them() -> None:
    # llama-model.cpp: upper_bound(splits, il / (n_layer + 1)); the output is layer n_layer
    placed = layer_devices(30, (1.0, 1.0))
    assert placed[:16] == [0] * 16 and placed[16:] == [1] * 15
    assert layer_devices(30, (1.0, 3.0)).count(0) == 8
    assert layer_devices(4, (0.0, 1.0)) == [1] * 5, "a zero share holds nothing"


def test_the_split_adds_up_to_the_single_machine_estimate() -> None:
    plan = plan_split(SMOLLM2, ["127.0.0.2:1", "127.0.0.3:1"], ctx=4096, parallel=2)
    full = estimate(SMOLLM2, ctx=4096, parallel=2, gpu_layers=-1)
    assert sum(d.weights for d in plan.devices) == full.breakdown["weights"]["device"]
    assert sum(d.kv_cache for d in plan.devices) == full.breakdown["kv_cache"]["device"]
    assert [len(d.layers) for d in plan.devices] == [16, 14]
    assert [d.output for d in plan.devices] == [False, True]
    assert plan.fits, "free memory unknown: nothing to refuse"


def test_auto_shares_fill_each_device_by_what_it_has_left() -> None:
    small, large = 120 * 1024**2, 2 * GiB
    even = plan_split(SMOLLM2, ["a", "b"], free=[small, large], shares=(1.0, 1.0), ctx=8192)
    auto = plan_split(SMOLLM2, ["a", "b"], free=[small, large], ctx=8192)
    assert not even.fits and not even.devices[0].fits
    assert auto.fits, auto.to_json()
    assert len(auto.devices[0].layers) < len(auto.devices[1].layers)


def test_a_split_that_cannot_fit_says_so() -> None:
    plan = plan_split(SMOLLM2, ["a", "b"], free=[10 * 1024**2, 10 * 1024**2])
    assert not plan.fits and all(not d.fits for d in plan.devices)


def test_shares_must_match_the_workers() -> None:
    with pytest.raises(ConfigError, match="3 values for 2"):
        plan_split(SMOLLM2, ["a", "b"], shares=(1.0, 1.0, 1.0))


# -- config and spec -----------------------------------------------------------------------
def _config(text: str) -> object:
    return parse_config(tomllib.loads(text))


GROUP = """
[workers.a]
endpoint = "127.0.0.2:50052"
[workers.b]
endpoint = "127.0.0.3"
[models.big]
path = "demo"
rpc = ["a", "b"]
tensor_split = [1, 3]
stall_timeout = "10s"
"""


def test_a_group_in_the_config_becomes_a_spec(tmp_path: Path) -> None:
    config = parse_config(tomllib.loads(GROUP))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    plan = config.plan(Path("/bin/true"), models_dir=tmp_path)
    spec = plan.models[0].spec
    assert spec.rpc == ("127.0.0.2:50052", "127.0.0.3:50052")
    assert spec.tensor_split == (1.0, 3.0) and spec.stall_timeout == 10.0
    argv = spec.argv(Endpoint.unix("big"))
    assert argv[argv.index("--rpc") + 1] == "127.0.0.2:50052,127.0.0.3:50052"
    assert argv[argv.index("-ts") + 1] == "1,3"
    assert config.warnings() == []


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[workers.a]\nendpoint = "10.0.0.2:50052"\n[models.m]\nrpc = ["a"]', "no authentication"),
        ('[workers.a]\nendpoint = "127.0.0.2"\n[models.m]\nrpc = ["b"]', r"no \[workers.b\]"),
        ('[workers.a]\nendpoint = "127.0.0.2"\n[models.m]\nrpc = ["a"]\n[models.n]\nrpc = ["a"]',
         "already used by models.m"),
        ('[workers.a]\nendpoint = "127.0.0.2"\n[models.m]\nrpc = ["a"]\ntensor_split = [1, 1]',
         "2 shares for 1 workers"),
        ('[workers.a]\n[models.m]\nrpc = ["a"]', "endpoint: missing"),
        ('[workers.a]\nendpoint = "box:1"\n[models.m]\nrpc = ["a"]', "not an IPv4"),
        ('[workers.a]\nendpont = "127.0.0.2"\n[models.m]', "workers.a.endpont: unknown key"),
    ],
)  # fmt: skip
def test_config_refuses_unsafe_or_impossible_groups(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        _config(text)


def test_a_trusted_network_may_hold_workers_and_three_workers_warn() -> None:
    text = "\n".join(
        f'[workers.w{i}]\nendpoint = "10.0.0.{i}:50052"\ntrusted_network = true' for i in (2, 3, 4)
    )
    config = parse_config(tomllib.loads(text + '\n[models.m]\nrpc = ["w2", "w3", "w4"]'))
    assert any("#28487" in w for w in config.warnings())


def test_the_spec_owns_rpc_and_keeps_slots_for_the_watchdog(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="managed by llamactl"):
        ServerSpec(name="m", model=tmp_path, binary=tmp_path, extra_args=("--rpc", "x:1"))
    with pytest.raises(ConfigError, match="tensor_split needs rpc"):
        ServerSpec(name="m", model=tmp_path, binary=tmp_path, tensor_split=(1.0,))
    with pytest.raises(ConfigError, match="--no-slots"):
        ServerSpec(
            name="m", model=tmp_path, binary=tmp_path, rpc=("127.0.0.2:1",),
            extra_args=("--no-slots",),
        )  # fmt: skip


def test_progress_is_read_from_busy_slots() -> None:
    from procman.distributed.group import progress as _progress

    slots = [
        {"id": 0, "is_processing": True, "id_task": 7, "n_prompt_tokens_processed": 31,
         "next_token": [{"n_decoded": 60}]},
        {"id": 1, "is_processing": False, "id_task": -1},
    ]  # fmt: skip
    assert _progress(slots) == ((0, 7, 31, 60),)
    assert _progress([{"id": 0, "is_processing": False}]) is None, "idle: nothing to watch"
    assert _progress({"error": "not supported"}) is None


# -- the worker ----------------------------------------------------------------------------
def test_a_worker_beyond_loopback_needs_to_be_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no authentication"):
        WorkerSpec(binary=tmp_path, host="0.0.0.0")
    spec = WorkerSpec(
        binary=tmp_path, host="10.0.0.2", allow_network=True, devices=("CUDA0",), cache=True
    )
    assert spec.argv()[1:] == ["-H", "10.0.0.2", "-p", "50052", "-d", "CUDA0", "-c"]


WORKER_OUTPUT = b"""\
Starting RPC server v7.0.0
  endpoint       : 127.0.0.2:50052
  local cache    : n/a
Devices:
  CPU: AMD EPYC 7B13 (24017 MiB, 20011 MiB free)
Accepted client connection
"""


def test_the_worker_output_says_protocol_devices_and_leader() -> None:
    status = WorkerStatus()
    lines = _Lines(status)
    half = len(WORKER_OUTPUT) // 2
    lines.feed(WORKER_OUTPUT[:half])  # a line split across two reads
    lines.feed(WORKER_OUTPUT[half:])
    assert status.protocol == "7.0.0"
    assert status.devices == [
        {"name": "CPU", "description": "AMD EPYC 7B13", "total": 24017 * 1024**2,
         "free": 20011 * 1024**2},
    ]  # fmt: skip
    assert status.leader_since is not None and status.to_json()["busy"]
    lines.feed(b"Client connection closed\n")
    assert status.leader_since is None and status.connections == 1


async def test_a_group_fails_its_first_start_but_waits_once_it_has_served(
    fake: Callable[..., Awaitable[str]],
) -> None:
    from procman.distributed.group import WorkerGroup

    up = await fake(worker_speaking(PROTOCOL, [(GiB, GiB)]))
    with socket.socket() as gone:
        gone.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{gone.getsockname()[1]}"
    group = WorkerGroup("m", (up, down), stall_timeout=5)
    waits: list[str] = []
    refused = await group.answer(served=False, waiting=waits.append, current=lambda: "")
    assert refused is not None and down in refused and "unreachable" in refused and not waits
    # once served: waits (reporting why), and goes on when the worker comes back
    waiting = asyncio.ensure_future(
        group.answer(served=True, waiting=waits.append, current=lambda: waits[-1] if waits else "")
    )
    await asyncio.sleep(0.3)
    assert not waiting.done() and len(waits) == 1 and down in waits[0]
    host, port = parse_endpoint(down)
    back = await asyncio.start_server(worker_speaking(PROTOCOL, [(GiB, GiB)]), host, port)
    try:
        assert await asyncio.wait_for(waiting, 5) is None
    finally:
        back.close()
        await back.wait_closed()
    assert [w["up"] for w in group.status(serving=False)] == [True, True]
    assert "lost" in await group.lost() and group.status(serving=False)[1]["lost"] == 1


async def test_the_restart_after_a_leader_ends_takes_the_probes_just_made(
    fake: Callable[..., Awaitable[str]],
) -> None:
    from procman.distributed.group import WorkerGroup

    speak = worker_speaking(PROTOCOL, [(GiB, GiB)])
    probes = 0

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal probes
        probes += 1
        await speak(reader, writer)

    group = WorkerGroup("m", (await fake(counted),), stall_timeout=5)
    assert await group.lost() == "" and probes == 1
    assert await group.answer(served=True, waiting=print, current=lambda: "") is None
    assert probes == 1  # not probed twice in a row
    assert await group.answer(served=True, waiting=print, current=lambda: "") is None
    assert probes == 2  # once only: the next start probes again


async def test_a_worker_of_another_version_is_never_waited_for(
    fake: Callable[..., Awaitable[str]],
) -> None:
    from procman.distributed.group import WorkerGroup

    other = await fake(worker_speaking((8, 0, 0), []))
    group = WorkerGroup("m", (other,), stall_timeout=5)
    refused = await group.answer(served=True, waiting=lambda why: None, current=lambda: "")
    assert refused is not None and "8.0.0" in refused


# -- the worker's status endpoint: the router's rules ------------------------------------------
class _FakeWorker:
    state = State.READY

    def to_json(self) -> dict[str, object]:
        return {"name": "worker-1", "state": "ready", "devices": [], "busy": False}


@pytest.mark.parametrize("key", [None, "s3cret"])
async def test_the_status_endpoint_refuses_foreign_hosts_origins_and_missing_keys(
    key: str | None,
) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from procman.distributed.status import status_app

    app = status_app(_FakeWorker(), version="b11312", api_key=key, host="127.0.0.1")  # type: ignore[arg-type]
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    async with TestClient(TestServer(app, host="127.0.0.1")) as http:
        ok = await http.get("/status", headers=auth)
        assert ok.status == 200 and (await ok.json())["version"] == "b11312"
        assert (await http.get("/status", headers={**auth, "Host": "evil.example"})).status == 403
        cross = {**auth, "Origin": "http://evil.example"}
        assert (await http.get("/status", headers=cross)).status == (403 if not key else 200)
        assert (await http.get("/status", headers={"Origin": "http://evil.example"})).status == 403
        assert (await http.post("/status", headers=auth)).status == 405
        if key:
            assert (await http.get("/status")).status == 401
            assert (await http.get("/status", headers={"Authorization": "Bearer no"})).status == 401


def test_a_worker_listens_on_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    assert WorkerSpec(binary=tmp_path).host == "127.0.0.1"
