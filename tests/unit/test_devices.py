"""Several GPUs in one machine, faked through NVML: placement, pinning, splits, refusals.

Machines of 2, 4 and 8 cards of mixed sizes (24 GiB + 12 GiB and the like);
the models are the Llama-3 8B and 70B shapes of test_gpu_layers and the tiny
test GGUF for the admission path (:class:`Limits` with a fake ``pynvml``).
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from buildtools.hardware.cuda import probe_nvidia_gpus
from procman.cli import main
from procman.cli._ctl import _table
from procman.config import parse_config
from procman.errors import AdmissionError, ConfigError
from procman.events import State
from procman.memory._limits import Limits
from procman.memory.budget import OverBudget
from procman.memory.devices import (
    Card,
    cards_from,
    device_margin,
    parse_devices,
    place,
    split_totals,
)
from procman.memory.enforce import LimitSettings
from procman.memory.estimate import MiB, estimate
from procman.process.endpoint import Endpoint
from procman.reload.diff import RESTART_FIELDS
from procman.router.metrics import MetricsExporter
from procman.spec import ServerSpec
from tests.unit.hardware_fakes import FakeGpu, FakeNvml
from tests.unit.test_gpu_layers import LLAMA8B, LLAMA70B
from tests.unit.test_metrics import Source
from tests.unit.test_model_file import write_model

GiB = 1024 * MiB
CTX = {"ctx": 4096, "parallel": 1}
ROW = {"name": "a", "state": "ready", "pid": 1, "port": None, "rss_bytes": 1, "restarts": 0,
       "model": "m.gguf"}  # fmt: skip


def gpu(index: int, total_gib: int, free_gib: float, name: str = "") -> FakeGpu:
    return FakeGpu(
        name=name or f"NVIDIA Fake {total_gib}GB",
        total=total_gib * GiB,
        free=int(free_gib * GiB),
        uuid=f"GPU-{index:08d}-0000-0000-0000-000000000000",
    )


def machine(*sizes: int, free: dict[int, float] | None = None) -> FakeNvml:
    """Cards of ``sizes`` GiB, each nearly empty unless ``free`` says otherwise."""
    free = free or {}
    return FakeNvml(gpus=[gpu(i, s, free.get(i, s - 0.5)) for i, s in enumerate(sizes)])


def cards(nvml: FakeNvml, ours: dict[str, int] | None = None) -> list[Card]:
    return cards_from(probe_nvidia_gpus(nvml).gpus, ours)


def uuid(index: int) -> str:
    return f"GPU-{index:08d}-0000-0000-0000-000000000000"


# -- the setting --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("auto", "auto"), ("all", "all"), ([0], (0,)), ([1, uuid(0)], (1, uuid(0)))],
)
def test_devices_parse(value: object, parsed: object) -> None:
    assert parse_devices(value) == parsed


@pytest.mark.parametrize("bad", ["first", [], [-1], [True], ["cuda0"], [0, 0], 1])
def test_bad_devices_are_refused_with_the_key(bad: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": {"a": {"devices": bad}}})
    assert caught.value.message.startswith("models.a.devices:"), caught.value.message
    assert "GPU indices or UUIDs" in caught.value.message or "twice" in caught.value.message


def test_devices_reach_the_spec_and_a_change_restarts(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    write_model(model)
    config = parse_config(tomllib.loads(f"[models.a]\npath = '{model}'\ndevices = [1]\n"))
    assert config.plan(tmp_path / "llama-server").models[0].spec.devices == (1,)
    assert "devices" in RESTART_FIELDS


# -- placement ----------------------------------------------------------------


def test_one_card_that_holds_the_model_is_the_roomiest() -> None:
    placed = place("auto", LLAMA8B, cards(machine(24, 12)), layers=33, **CTX)
    assert [c.index for c in placed.cards] == [0] and placed.shares == ()
    assert placed.device_bytes == (estimate(LLAMA8B, gpu_layers=33, **CTX).device_bytes,)
    assert placed.fits and placed.reason.startswith("auto: GPU 0, the one with the most room")


@pytest.mark.parametrize("allocated", [True, False])
def test_several_models_pack_onto_cards_without_overcommitting_any(allocated: bool) -> None:
    """8B models (~5.5 GiB each at 4k context) onto 24 + 12 + 12 + 8 GiB: each goes to the
    card with most room now, until no card holds one alone; every card stays within its
    limit. ``allocated`` False: the servers are admitted but NVML's free figure does not
    show them yet (still loading)."""
    nvml = machine(24, 12, 12, 8)
    start = probe_nvidia_gpus(nvml).gpus
    ours: dict[str, int] = {}
    chosen: list[int] = []
    while True:
        now = cards_from(probe_nvidia_gpus(nvml).gpus, ours, start)
        placed = place("auto", LLAMA8B, now, layers=33, **CTX)
        assert placed.fits
        if len(placed.cards) > 1:
            break
        card = placed.cards[0]
        assert card.room == max(c.room for c in now)
        chosen.append(card.index)
        ours[card.uuid] = ours.get(card.uuid, 0) + placed.device_bytes[0]
        if allocated:
            nvml.gpus[card.index].free -= placed.device_bytes[0]
    # 22.3 GiB usable on the 24 GiB card holds four, 10.9 on a 12 GiB card one, 7 on 8 GiB one
    assert chosen == [0, 0, 0, 1, 2, 3, 0]
    for card in cards_from(probe_nvidia_gpus(nvml).gpus, ours, start):
        assert card.ours <= card.limit <= card.total - device_margin(card.total), card.label
    # the next one no card holds alone: split over the two roomiest
    assert len(placed.cards) == 2 and placed.reason.startswith("auto: 2 GPUs, the fewest")


def test_pinning_takes_exactly_the_cards_named_by_index_or_uuid() -> None:
    found = cards(machine(24, 12, 12, 8))
    assert [c.index for c in place((2,), LLAMA8B, found, layers=33, **CTX).cards] == [2]
    by_uuid = place((uuid(3), 1), LLAMA8B, found, layers=33, **CTX)
    assert [c.index for c in by_uuid.cards] == [3, 1]  # the order given is CUDA's order
    assert by_uuid.reason.startswith("devices pinned to GPU 3, 1")


def test_a_model_too_big_for_one_card_is_split_with_tensor_split_ratios() -> None:
    """70B Q4 (~41.6 GiB at 4k) on 8 cards, none of which holds it: the fewest that do,
    the roomiest first, and -ts by each one's room after its fixed costs."""
    nvml = machine(24, 12, 40, 12, 8, 8, 24, 16)
    placed = place("auto", LLAMA70B, cards(nvml), layers=81, **CTX)
    assert [c.index for c in placed.cards] == [0, 2]  # 40 + 24 GiB: two cards are enough
    assert placed.fits and len(placed.shares) == 2
    fixed = sum(
        estimate(LLAMA70B, gpu_layers=81, **CTX).breakdown[k]["device"]
        for k in ("compute", "overhead")
    )
    rooms = [c.room - fixed for c in placed.cards]
    assert placed.shares == tuple(float(r // MiB) for r in rooms)
    # the layers follow the shares: the 40 GiB card takes its part of the weights
    weights = [b - fixed for b in placed.device_bytes]
    assert weights[1] / sum(weights) == pytest.approx(rooms[1] / sum(rooms), abs=0.02)
    total_one_card = estimate(LLAMA70B, gpu_layers=81, **CTX).device_bytes
    assert sum(placed.device_bytes) == total_one_card + fixed  # a second context and graph
    assert all(b <= c.room for b, c in zip(placed.device_bytes, placed.cards, strict=True))


def test_all_splits_across_every_card() -> None:
    placed = place("all", LLAMA8B, cards(machine(24, 12)), layers=33, **CTX)
    assert [c.index for c in placed.cards] == [0, 1] and len(placed.shares) == 2
    assert placed.shares[0] > placed.shares[1] > 0


def test_split_totals_match_the_single_card_estimate_per_layer() -> None:
    one = split_totals(LLAMA8B, (1.0,), layers=20, **CTX)
    assert one == (estimate(LLAMA8B, gpu_layers=20, **CTX).device_bytes,)
    # a zero share gets no layer, only its context
    two = split_totals(LLAMA8B, (1.0, 0.0), layers=33, **CTX)
    fixed = sum(
        estimate(LLAMA8B, gpu_layers=33, **CTX).breakdown[k]["device"]
        for k in ("compute", "overhead")
    )
    assert two[1] == fixed and two[0] == estimate(LLAMA8B, gpu_layers=33, **CTX).device_bytes


def test_a_pinned_card_that_is_gone_is_refused_by_name() -> None:
    with pytest.raises(AdmissionError, match=r"devices lists GPU 3, which NVML does not report"):
        place((3,), LLAMA8B, cards(machine(24, 12)), layers=33, **CTX)
    with pytest.raises(AdmissionError, match="no NVIDIA GPU"):
        place("auto", LLAMA8B, [], layers=33, **CTX)


def test_the_margin_is_a_share_of_the_card() -> None:
    assert device_margin(8 * GiB) == 512 * MiB
    assert device_margin(80 * GiB) == 4 * GiB


# -- admission, through Limits with a fake NVML ---------------------------------


def cuda_spec(tmp_path: Path, name: str, **fields: object) -> ServerSpec:
    model = tmp_path / "m.gguf"
    if not model.exists():
        write_model(model)
    binary = tmp_path / "bin" / "llama-server"
    binary.parent.mkdir(exist_ok=True)
    (binary.parent / "libggml-cuda.so").touch()  # what is_cuda_build looks for
    return ServerSpec(name=name, model=model, binary=binary, **fields)  # type: ignore[arg-type]


def gpu_limits(nvml: FakeNvml, vram_budget: str | None = "auto") -> Limits:
    return Limits(
        memory_budget=None,
        vram_budget=vram_budget,
        activity=lambda name: (0.0, True),  # every server busy: nothing is evicted
        settings=LimitSettings(),
        use_nvml=False,
        nvml=nvml,
    )


def admit(limits: Limits, spec: ServerSpec) -> ServerSpec:
    prepared = limits.prepare(spec, None)
    limits.reserve(spec.name, prepared.need)
    return prepared.spec


def test_admitted_servers_see_only_their_card(tmp_path: Path) -> None:
    """The tiny test model (~0.6 GiB on a card: mostly the CUDA context) on 2 GiB cards,
    whose limit is 1.5 GiB: two per card, each server pinned to its card by UUID."""
    nvml = FakeNvml(gpus=[gpu(0, 2, 2.0), gpu(1, 2, 1.9)])
    limits = gpu_limits(nvml)
    first = admit(limits, cuda_spec(tmp_path, "a", gpu_layers="auto"))
    assert first.visible_devices == (uuid(0),) and first.tensor_split == ()
    env = first.env()
    assert env is not None and env["CUDA_VISIBLE_DEVICES"] == uuid(0)
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert first.gpu_layers == 3  # the test model's 2 layers and its output layer
    second = admit(limits, cuda_spec(tmp_path, "b", gpu_layers="auto"))
    assert second.visible_devices == (uuid(1),)  # card 0 has less room now
    assert limits.ledger.held_by_device().keys() == {uuid(0), uuid(1)}
    # a CPU-only model is not placed and sees the environment as it is
    cpu = limits.prepare(cuda_spec(tmp_path, "c", gpu_layers=0), None).spec
    assert cpu.visible_devices == () and cpu.env() is None


def test_refusal_names_the_full_card(tmp_path: Path) -> None:
    nvml = FakeNvml(gpus=[gpu(0, 24, 23.5, "NVIDIA GeForce RTX 4090"), gpu(1, 2, 0.3)])
    limits = gpu_limits(nvml)
    with pytest.raises(OverBudget) as caught:
        admit(limits, cuda_spec(tmp_path, "a", gpu_layers="all", devices=(1,)))
    message = caught.value.message
    assert message.startswith("model 'a' needs ")
    assert f"of vram on GPU 1 (NVIDIA Fake 2GB, {uuid(1)})" in message
    assert "is free there" in message and caught.value.device.startswith("GPU 1")
    assert "pin the model to another one" in (caught.value.hint or "")
    assert limits.ledger.stats.refusals == 1
    # the same model unpinned goes to the card with room
    assert admit(limits, cuda_spec(tmp_path, "b", gpu_layers="all")).visible_devices == (uuid(0),)


def test_a_card_that_disappears_between_two_loads(tmp_path: Path) -> None:
    nvml = machine(24, 12)
    limits = gpu_limits(nvml)
    assert admit(limits, cuda_spec(tmp_path, "a", devices=(1,))).visible_devices == (uuid(1),)
    limits.release("a")
    nvml.gpus.pop(1)  # fell off the bus, or was handed to a VM
    with pytest.raises(AdmissionError, match=r"devices lists GPU 1, which NVML does not report"):
        limits.prepare(cuda_spec(tmp_path, "a", devices=(1,)), None)
    assert admit(limits, cuda_spec(tmp_path, "b")).visible_devices == (uuid(0),)


def test_an_evictable_server_frees_its_card(tmp_path: Path) -> None:
    nvml = FakeNvml(gpus=[gpu(0, 2, 2.0)])
    idle = Limits(
        memory_budget=None,
        vram_budget="auto",
        activity=lambda name: (0.0, False),  # idle: may be evicted
        settings=LimitSettings(),
        use_nvml=False,
        nvml=nvml,
    )
    admit(idle, cuda_spec(tmp_path, "a", gpu_layers="all"))
    admit(idle, cuda_spec(tmp_path, "b", gpu_layers="all"))
    prepared = idle.prepare(cuda_spec(tmp_path, "c", gpu_layers="all"), None)
    reservation = idle.reserve("c", prepared.need)
    assert reservation.evict == ("a",)
    assert reservation.decision.reason == (
        f"c fits on GPU 0 (NVIDIA Fake 2GB, {uuid(0)}) after stopping idle a"
    )


def test_a_split_spec_passes_tensor_split_and_split_mode(tmp_path: Path) -> None:
    spec = cuda_spec(tmp_path, "a", gpu_layers="all", devices="all")
    placed = gpu_limits(machine(24, 12)).prepare(spec, None)
    argv = placed.spec.argv(Endpoint.unix("a"))
    assert placed.spec.visible_devices == (uuid(0), uuid(1))
    assert argv[argv.index("-ts") + 1] == ",".join(f"{s:g}" for s in placed.spec.tensor_split)
    assert argv[argv.index("--split-mode") + 1] == "layer"
    assert placed.devices_reason.startswith("devices all: 2 GPUs split ")
    assert placed.need.devices.keys() == {uuid(0), uuid(1)}
    assert placed.need.device_bytes == sum(placed.need.devices.values())


def test_without_a_vram_budget_cards_are_not_checked(tmp_path: Path) -> None:
    limits = gpu_limits(FakeNvml(gpus=[gpu(0, 2, 0.1)]), vram_budget=None)
    spec = admit(limits, cuda_spec(tmp_path, "a", gpu_layers="all"))
    assert spec.visible_devices == (uuid(0),)  # placed (isolated), but not refused


# -- metering, status, /metrics, ps -------------------------------------------------------------


@dataclass
class Running:
    pid: int
    usedGpuMemory: int | None


@dataclass
class RunningNvml(FakeNvml):
    """The fake machine plus NVML's per-process figures, by card UUID."""

    running: dict[str, list[Running]] = field(default_factory=dict)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu) -> list[Running]:
        return self.running.get(handle.uuid, [])


def test_vram_is_metered_per_card_and_raises_the_ledger_there(tmp_path: Path) -> None:
    pid = os.getpid()
    nvml = RunningNvml(gpus=[gpu(0, 24, 23.5), gpu(1, 12, 11.5)])
    limits = Limits(
        memory_budget=None,
        vram_budget="auto",
        activity=lambda name: (0.0, True),
        settings=LimitSettings(),
        nvml=nvml,
    )
    spec = admit(limits, cuda_spec(tmp_path, "a", gpu_layers="all", devices="all"))
    reserved = limits.ledger.devices_of("a")
    # NVML shows it 3 GiB on card 1, far above the estimate; and 1 byte on card 0
    nvml.running = {uuid(0): [Running(pid, 1)], uuid(1): [Running(pid, 3 * GiB)]}
    limits.sample({"a": pid})
    sample = limits.samples["a"]
    assert sample.vram_by_device == {uuid(0): 1, uuid(1): 3 * GiB}
    assert sample.vram_bytes == 3 * GiB + 1
    assert limits.ledger.devices_of("a") == {uuid(0): reserved[uuid(0)], uuid(1): 3 * GiB}

    rows = limits.devices_status("a", spec.visible_devices)
    assert rows == [
        {"index": 0, "uuid": uuid(0), "name": "NVIDIA Fake 24GB",
         "reserved_bytes": reserved[uuid(0)], "vram_bytes": 1},
        {"index": 1, "uuid": uuid(1), "name": "NVIDIA Fake 12GB",
         "reserved_bytes": 3 * GiB, "vram_bytes": 3 * GiB},
    ]  # fmt: skip
    server = SimpleNamespace(
        name="a", pid=pid, restarts=0, state=State.READY, spec=spec, workers_status=list
    )
    snap = limits.snapshot([(server, 0)], {})  # type: ignore[list-item]
    assert snap.servers[0].devices == (("0", uuid(0), 1), ("1", uuid(1), 3 * GiB))
    text = MetricsExporter(Source(snap)).render().decode()
    assert (
        f'llamactl_server_device_vram_bytes{{gpu="1",server="a",uuid="{uuid(1)}"}} 3.221225472e+09'
        in text
    )
    shown = _table([{**ROW, "devices": rows}])
    console = Console(width=200, record=True)
    console.print(shown)
    assert f"GPU 1 {uuid(1)} 3.0 GiB (reserved 3.0 GiB)" in console.export_text()
    limits.close()


# -- llamactl estimate --devices ------------------------------------------------------------------


def test_estimate_devices_reports_the_split_per_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from procman.memory import budget

    real = budget.probe_machine
    monkeypatch.setattr(budget, "probe_machine", lambda: real(machine(24, 12)))
    model = tmp_path / "m.gguf"
    write_model(model)
    args = ["estimate", str(model), "--gpu-layers", "-1", "--ctx", "256"]
    assert main([*args, "--devices", "all", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [d["index"] for d in doc["devices"]] == [0, 1] and len(doc["tensor_split"]) == 2
    assert all(d["fits"] and d["bytes"] > 0 for d in doc["devices"]) and doc["fits"]
    assert main([*args, "--devices", "1"]) == 0
    text = capsys.readouterr().out
    assert "devices pinned to GPU 1 (GPU 1 ~" in text and "room)" in text
    assert main([*args, "--devices", "5"]) != 0
    assert "devices lists GPU 5, which NVML does not report" in capsys.readouterr().err
    assert main([*args, "--devices", "first"]) != 0
    assert "--devices: expected" in capsys.readouterr().err


def test_unset_gpu_layers_reserve_what_fits_and_leave_the_choice_to_llama_server(
    tmp_path: Path,
) -> None:
    """A model bigger than the card with gpu_layers unset is not refused: llama-server
    offloads what fits by itself, and that much is reserved on the card."""
    small = FakeNvml(gpus=[gpu(0, 2, 0.9)])  # room: 0.4 GiB, below the CUDA context alone
    limits = gpu_limits(small)
    full = limits.prepare(cuda_spec(tmp_path, "full", gpu_layers="all"), None)
    (card,) = cards(small)
    assert full.need.devices[uuid(0)] > card.room  # all layers would not fit
    prepared = limits.prepare(cuda_spec(tmp_path, "a"), None)
    assert prepared.spec.gpu_layers is None and prepared.spec.visible_devices == (uuid(0),)
    assert prepared.layers_reason.startswith("gpu_layers: unset, reserved as auto: 0 layers")
    assert prepared.need.devices[uuid(0)] <= card.room
    limits.reserve("a", prepared.need)  # admitted
    with pytest.raises(OverBudget, match="of vram on GPU 0"):
        limits.reserve("full", full.need)  # while all layers are refused, naming the card


def test_auto_goes_where_stopping_idle_models_makes_room(tmp_path: Path) -> None:
    """Both cards full, one with an idle model and one with a busy one: the new model goes
    to the card whose idle model can stop, not split over both (which would evict both)."""
    nvml = FakeNvml(gpus=[gpu(0, 2, 1.4), gpu(1, 2, 1.5)])  # limits: 0.9 and 1.0 GiB
    limits = Limits(
        memory_budget=None,
        vram_budget="auto",
        activity=lambda name: (0.0, name != "idle"),
        settings=LimitSettings(),
        use_nvml=False,
        nvml=nvml,
    )
    assert admit(limits, cuda_spec(tmp_path, "busy", gpu_layers="all", devices=(1,)))
    assert admit(limits, cuda_spec(tmp_path, "idle", gpu_layers="all", devices=(0,)))
    now = cards_from(probe_nvidia_gpus(nvml).gpus, limits.ledger.held_by_device(),
                     baseline=limits.machine.gpus)  # fmt: skip
    assert all(c.room < limits.ledger.devices_of("idle")[uuid(0)] for c in now)  # both full
    prepared = limits.prepare(cuda_spec(tmp_path, "new", gpu_layers="all"), None)
    assert prepared.spec.visible_devices == (uuid(0),)
    assert prepared.devices_reason.startswith("auto: GPU 0 once idle models stop")
    assert limits.reserve("new", prepared.need).evict == ("idle",)
