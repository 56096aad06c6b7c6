"""The supervisor's memory side: budget, admission ledger, meter and per-model limits.

Kept apart from :mod:`procman.supervisor` (which owns the servers and their
timers) so that the numbers can be read and tested without processes. The
supervisor asks :meth:`Limits.prepare` before each start (the ``-ngl``
choice and what the server will need), :meth:`Limits.reserve` to be
admitted, and :meth:`Limits.sample` periodically; it acts on what comes back.

Everything is built lazily, at the first load: constructing a supervisor
(as the desktop facade and the unit tests do) must not open NVML.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from procman.memory.budget import (
    Activity,
    Budget,
    Ledger,
    MachineMemory,
    Need,
    OverBudget,
    Reservation,
    Size,
    probe_machine,
    resolve_budget,
)
from procman.memory.enforce import CgroupSupport, LimitDecision, LimitSettings, MemoryLimit
from procman.memory.meter import LlamaMetrics, Meter, Sample
from procman.router.metrics import ServerStats, Snapshot
from procman.spec import ServerSpec

if TYPE_CHECKING:
    from procman.memory.estimate import Estimate
    from procman.models.gguf import ModelInfo
    from procman.process.server import ManagedServer

log = logging.getLogger(__name__)

__all__ = ["Limits", "Prepared", "flags_from_args", "is_cuda_build"]


def is_cuda_build(binary: Path) -> bool:
    """Whether ``binary`` can offload to an NVIDIA GPU: its CUDA backend lies beside it.

    Backend-DL builds ship ``libggml-cuda.so`` next to ``llama-server``; a
    static CUDA build has no module to see, so its build manifest's
    ``backend`` is asked too (``<build>/manifest.json``, one level up).
    """
    here = binary.parent
    if any(here.glob("*ggml-cuda*")):
        return True
    import json  # speed

    try:
        manifest = json.loads((here.parent / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    plan = manifest.get("plan") if isinstance(manifest, dict) else None
    return isinstance(plan, dict) and plan.get("backend") == "cuda"


@dataclass(frozen=True, kw_only=True)
class Prepared:
    """What one start will run and hold."""

    spec: ServerSpec
    need: Need
    #: why ``-ngl`` is what it is ("" when the spec does not set gpu_layers)
    layers_reason: str = ""
    #: which GPUs and why ("" when it was not placed: a CPU build, or no NVIDIA GPU)
    devices_reason: str = ""


class Limits:
    """Budget, ledger, meter and memory limits of one supervisor."""

    def __init__(
        self,
        *,
        memory_budget: Size,
        vram_budget: Size,
        activity: Activity,
        settings: LimitSettings,
        machine: MachineMemory | None = None,
        use_nvml: bool = True,
        nvml: Any = None,
    ) -> None:
        """``nvml``: a fake ``pynvml`` for the GPU probes (tests); None: the real one."""
        self._nvml = nvml
        self.machine = machine or probe_machine(nvml)
        self.budget: Budget = resolve_budget(memory_budget, vram_budget, self.machine)
        self.ledger = Ledger(self.budget, activity)
        self.meter = Meter(use_nvml=use_nvml, nvml=nvml)
        self.settings = settings
        from procman.memory.enforce import detect_cgroup_v2  # speed

        self.cgroup: CgroupSupport = detect_cgroup_v2()
        self._limits: dict[str, MemoryLimit] = {}
        self.samples: dict[str, Sample] = {}
        self.tokens_per_second: dict[str, float] = {}
        self._scraped: dict[str, tuple[float, LlamaMetrics]] = {}
        self._groups: dict[str, Path] = {}
        #: every GPU a placement has seen, by UUID: its index and name, for status and metrics
        self.cards: dict[str, tuple[int, str]] = {}

    def set_budget(self, memory_budget: Size, vram_budget: Size) -> None:
        """New budgets (a config reload): later admissions are decided against them."""
        self.budget = self.ledger.budget = resolve_budget(memory_budget, vram_budget, self.machine)

    # -- before a start ------------------------------------------------------------------------
    def prepare(self, spec: ServerSpec, memory_limit: int | None) -> Prepared:
        """Validate the model, choose ``-ngl``, estimate; blocking (reads the GGUF header).

        Raises ``ModelError`` for a bad file and ``OverBudget`` when the
        estimate alone exceeds ``memory_limit``.
        """
        from procman.memory.estimate import estimate  # speed
        from procman.memory.gpu_layers import choose_gpu_layers  # speed
        from procman.models.gguf import validate_model  # speed

        info = validate_model(spec.model)
        reason = ""
        layers = 0
        if spec.rpc:
            return self._prepare_group(spec, info, memory_limit)
        machine = probe_machine(self._nvml) if is_cuda_build(spec.binary) else None
        if machine is not None and machine.gpus and spec.gpu_layers != 0:
            return self._prepare_placed(spec, info, memory_limit, machine)
        if spec.gpu_layers is not None:
            free = machine.vram_free_bytes if machine is not None else None
            choice = choose_gpu_layers(
                spec.gpu_layers,
                info,
                free_vram_bytes=free,
                ctx=spec.ctx or 0,
                parallel=spec.parallel,
                cache_ram=spec.cache_ram_bytes,
            )
            layers, reason = choice.layers, f"gpu_layers: {choice.reason}"
            if free is None:
                layers = 0  # a CPU build offloads nothing, whatever -ngl says
            spec = dataclasses.replace(spec, gpu_layers=choice.layers)
        mapped, checkpoints = flags_from_args(spec.extra_args)
        est = estimate(
            info,
            ctx=spec.ctx or 0,
            parallel=spec.parallel,
            gpu_layers=layers,
            cache_ram=spec.cache_ram_bytes,
            mmap=mapped,
            ctx_checkpoints=checkpoints,
        )
        need = self._need(spec.name, est, memory_limit)
        return Prepared(spec=spec, need=need, layers_reason=reason)

    def _prepare_placed(
        self, spec: ServerSpec, info: ModelInfo, memory_limit: int | None, machine: MachineMemory
    ) -> Prepared:
        """A CUDA build with NVIDIA GPUs: the cards are chosen first (for the whole model,
        or the configured ``-ngl``), then ``gpu_layers = "auto"`` offloads what their room
        holds; the ledger checks each card (:mod:`procman.memory.devices`)."""
        from procman.memory.devices import cards_from, place  # speed
        from procman.memory.estimate import estimate  # speed
        from procman.memory.gpu_layers import choose_gpu_layers  # speed

        mapped, checkpoints = flags_from_args(spec.extra_args)
        args: dict[str, Any] = {
            "ctx": spec.ctx or 0,
            "parallel": spec.parallel,
            "cache_ram": spec.cache_ram_bytes,
            "mmap": mapped,
            "ctx_checkpoints": checkpoints,
        }
        full = info.n_layers + 1
        ours = self.ledger.held_by_device()
        busy = self.ledger.held_by_device(busy=True)
        cards = cards_from(machine.gpus, ours, baseline=self.machine.gpus, busy=busy)
        self.cards.update({c.uuid: (c.index, c.name) for c in cards})
        layers = min(spec.gpu_layers, full) if isinstance(spec.gpu_layers, int) else full
        placement = place(spec.devices, info, cards, layers=layers, **args)
        reason = ""
        if spec.gpu_layers in ("auto", None) and not placement.fits:
            # unset: llama-server's own default offloads what fits too; reserve that much
            room = sum(c.room for c in placement.cards)
            choice = choose_gpu_layers("auto", info, free_vram_bytes=room, margin=0, **args)
            pinned = placement.uuids
            placement = place(pinned, info, placement.cards, layers=choice.layers, **args)
            unset = "unset, reserved as " if spec.gpu_layers is None else ""
            reason = f"gpu_layers: {unset}{choice.reason}"
        elif spec.gpu_layers == "auto":
            reason = f"gpu_layers: auto: all {full} layers fit on the chosen GPUs"
        elif spec.gpu_layers is not None:
            reason = f"gpu_layers: {layers}/{full} layers as configured"
        layers = placement.layers
        spec = dataclasses.replace(
            spec,
            gpu_layers=layers if spec.gpu_layers is not None else None,
            visible_devices=placement.uuids,
            tensor_split=placement.shares,
        )
        est = estimate(info, gpu_layers=layers, **args)
        need = self._need(spec.name, est, memory_limit)
        need = dataclasses.replace(
            need,
            device_bytes=sum(placement.device_bytes),
            devices=placement.by_uuid(),
            device_limits={c.uuid: (c.limit, c.label) for c in placement.cards},
        )
        return Prepared(spec=spec, need=need, layers_reason=reason, devices_reason=placement.reason)

    def _need(self, name: str, est: Estimate, memory_limit: int | None) -> Need:
        """What ``est`` asks of the budget; refused (and counted) above ``memory_limit``."""
        self.set_limit(name, memory_limit)
        try:
            return Need.of(est, memory_limit=memory_limit)
        except OverBudget:
            self.ledger.stats.refusals += 1  # refused as surely as by the budget
            raise

    def _prepare_group(
        self, spec: ServerSpec, info: ModelInfo, memory_limit: int | None
    ) -> Prepared:
        """A leader whose layers live on RPC workers: every layer is offloaded to them
        (``-ngl all`` unless set), and only what stays here (input embeddings, logits,
        the leader's compute buffer, its overhead) counts against this machine's budget.
        What each worker holds is checked against its own free memory by
        ``llamactl estimate --rpc``, not here."""
        from procman.memory.estimate import estimate  # speed

        if spec.gpu_layers is None:
            spec = dataclasses.replace(spec, gpu_layers="all")
        full = estimate(
            info,
            ctx=spec.ctx or 0,
            parallel=spec.parallel,
            gpu_layers=spec.gpu_layers if isinstance(spec.gpu_layers, int) else -1,
            cache_ram=spec.cache_ram_bytes,
        )
        est = dataclasses.replace(full, device_bytes=0)  # the devices are the workers'
        need = self._need(spec.name, est, memory_limit)
        workers = len(spec.rpc)
        reason = f"rpc: layers on {workers} worker{'s' * (workers > 1)} ({', '.join(spec.rpc)})"
        return Prepared(spec=spec, need=need, layers_reason=reason)

    def set_limit(self, name: str, memory_limit: int | None) -> None:
        """(Re)set ``name``'s enforced limit; it applies from the next sample."""
        self._limits[name] = MemoryLimit(
            dataclasses.replace(self.settings, memory_limit=memory_limit)
        )

    def reserve(self, name: str, need: Need) -> Reservation:
        return self.ledger.reserve(name, need)

    def release(self, name: str) -> None:
        self.ledger.release(name)
        self._limits.get(name, MemoryLimit(LimitSettings())).reset()
        self.samples.pop(name, None)
        self.tokens_per_second.pop(name, None)
        self._scraped.pop(name, None)

    # -- while running ---------------------------------------------------------------------------
    def sample(
        self, pids: Mapping[str, int], by_pid: Mapping[int, Sample] | None = None
    ) -> dict[str, LimitDecision]:
        """Read every running server (or take ``by_pid``, read already by ``self.meter``);
        the limit decisions due now, by server name."""
        if by_pid is None:
            by_pid = self.meter.sample(pids.values())
        decisions: dict[str, LimitDecision] = {}
        for name, pid in pids.items():
            s = by_pid[pid]
            if not s.alive:
                continue
            self.samples[name] = s
            self.ledger.measure(name, s.rss_bytes, s.vram_bytes, s.vram_by_device)
            limit = self._limits.get(name)
            if limit is not None and (d := limit.observe(s.time, s.rss_bytes)) is not None:
                decisions[name] = d
        for gone in self.samples.keys() - pids.keys():
            del self.samples[gone]
        return decisions

    async def scrape(self, servers: Iterable[ManagedServer]) -> None:
        """Token counts of the servers run with ``--metrics`` (llama-server serves none without)."""
        import asyncio  # speed
        import time  # speed

        from procman.memory.meter import scrape_llama_metrics  # speed

        asked = [
            (s, endpoint)
            for s in servers
            if (endpoint := s.endpoint) is not None and "--metrics" in s.spec.extra_args
        ]
        if not asked:
            return
        got = await asyncio.gather(*(scrape_llama_metrics(e) for _, e in asked))
        now = time.monotonic()
        for (server, _), metrics in zip(asked, got, strict=True):
            if metrics is not None:
                self.record_metrics(server.name, now, metrics)

    def record_metrics(self, name: str, now: float, metrics: LlamaMetrics) -> None:
        """A scrape of llama-server's ``/metrics``: tokens per second since the previous one."""
        previous = self._scraped.get(name)
        self._scraped[name] = (now, metrics)
        if previous is not None:
            self.tokens_per_second[name] = metrics.tokens_per_second_since(
                previous[1], now - previous[0]
            )

    # -- cgroups: the kernel enforces where it can --------------------------------------------
    def on_spawn(self, name: str, pid: int, memory_limit: int | None) -> None:
        """Right after spawn: put a limited server in its own ``memory.max`` group, if possible."""
        if memory_limit is None or not self.cgroup.available:
            return
        from procman.errors import ConfigError  # speed
        from procman.memory.enforce import limit_in_cgroup  # speed

        try:
            self._groups[name] = limit_in_cgroup(self.cgroup, name, pid, memory_limit)
        except ConfigError as exc:  # the polling limit still applies
            log.warning("%s", exc.message)

    def on_reaped(self, name: str) -> None:
        from procman.memory.enforce import remove_cgroup  # speed

        if (group := self._groups.pop(name, None)) is not None:
            remove_cgroup(group)

    def snapshot(
        self, servers: Iterable[tuple[ManagedServer, int]], queue_depth: Mapping[str, int]
    ) -> Snapshot:
        """``servers``: each with its request count."""
        stats = []
        restarts = 0
        for server, requests in servers:
            s = self.samples.get(server.name) if server.pid is not None else None
            restarts += server.restarts
            stats.append(
                ServerStats(
                    name=server.name,
                    state=server.state,
                    rss_bytes=s.rss_bytes if s else None,
                    pss_bytes=s.pss_bytes if s else None,
                    cpu_percent=s.cpu_percent if s else None,
                    vram_bytes=s.vram_bytes if s else None,
                    tokens_per_second=self.tokens_per_second.get(server.name),
                    restarts_total=server.restarts,
                    requests_total=requests,
                    rpc_workers=tuple(
                        (w["endpoint"], w["up"], w["lost"]) for w in server.workers_status()
                    ),
                    devices=tuple(
                        (str(d["index"]), d["uuid"], d["vram_bytes"])
                        for d in self.devices_status(server.name, server.spec.visible_devices)
                    ),
                )
            )
        counts = self.ledger.stats
        return Snapshot(
            servers=stats,
            queue_depth=dict(queue_depth),
            admissions_total=counts.admissions,
            evictions_total=counts.evictions,
            refusals_total=counts.refusals,
            restarts_total=restarts,
        )

    def devices_status(self, name: str, uuids: Iterable[str]) -> list[dict[str, Any]]:
        """``name``'s GPUs: index, UUID, name, bytes reserved there, bytes NVML measured."""
        sample = self.samples.get(name)
        measured = sample.vram_by_device if sample is not None else None
        held = self.ledger.devices_of(name)
        rows = []
        for uuid in uuids:
            index, card = self.cards.get(uuid, (None, ""))
            rows.append(
                {
                    "index": index,
                    "uuid": uuid,
                    "name": card,
                    "reserved_bytes": held.get(uuid),
                    "vram_bytes": None if measured is None else measured.get(uuid, 0),
                }
            )
        return rows

    def close(self) -> None:
        self.meter.close()


#: --load-mode values that map the file (llama-server's default, auto, maps it too)
_MAPPED = frozenset({"auto", "mmap", "mmap+mlock"})


def flags_from_args(args: Iterable[str]) -> tuple[bool, int]:
    """The estimate's ``mmap`` and ``ctx_checkpoints`` from llama-server arguments.

    Only what changes the estimate is read; the server itself parses them.
    Defaults are llama-server's: mapped, 32 checkpoints a slot.
    """
    mmap, checkpoints = True, 32
    argv = list(args)
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if flag in ("-lm", "--load-mode"):
            mmap = value in _MAPPED
        elif flag in ("-ctxcp", "--ctx-checkpoints", "--swa-checkpoints") and value.isdigit():
            checkpoints = int(value)
    return mmap, checkpoints
