"""Memory and VRAM budgets, and admission of servers against them.

A server is admitted when its *estimate* fits, before it runs, because the
failure it prevents (the OOM killer taking a random process, or a CUDA
allocation failing half way through loading) happens before anything could
be measured. The pieces:

* :func:`resolve_budget` turns the settings (``"auto"``, a size, or None for
  "no limit") into numbers once, from a :class:`MachineMemory` probe.
* :func:`decide` is the pure rule: given what a candidate needs and what is
  resident, admit it, admit it after evicting the least recently used *idle*
  servers, or refuse it with an :class:`OverBudget` that carries the numbers.
* :class:`Ledger` holds what is admitted or reserved. ``reserve()`` decides
  and records in one synchronous step, with no ``await`` in between, so
  loads starting together in one event loop cannot over-commit (a lock makes
  it hold for threads too). A reservation holds the estimate until the
  server is measured (:meth:`Ledger.measure`) or released.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

from procman._units import format_bytes, parse_size
from procman.errors import AdmissionError, ConfigError
from procman.memory.estimate import Estimate, MiB

if TYPE_CHECKING:
    from buildtools.hardware import GpuInfo

__all__ = [
    "HOST_MARGIN_FRACTION",
    "HOST_MARGIN_MIN",
    "VRAM_MARGIN_FRACTION",
    "VRAM_MARGIN_MIN",
    "Activity",
    "Budget",
    "Decision",
    "Ledger",
    "LedgerStats",
    "MachineMemory",
    "Need",
    "OverBudget",
    "Reservation",
    "Resident",
    "Size",
    "Verdict",
    "decide",
    "host_margin",
    "probe_machine",
    "resolve_budget",
]

GiB = 1024 * MiB

#: "auto" leaves this share of *total* RAM (at least HOST_MARGIN_MIN) out of the
#: budget: the estimate is within ~10% of peak RSS, llama-server mmaps its weights
#: (page cache the kernel must be able to keep), and the desktop that embeds us
#: keeps growing after we looked at ``available``.
HOST_MARGIN_FRACTION = 0.10
HOST_MARGIN_MIN = 1 * GiB
#: "auto" VRAM leaves this share of total VRAM (at least VRAM_MARGIN_MIN) free:
#: the per-process CUDA overhead in the estimate is a typical figure, not a
#: measured one, the allocator fragments, and a display server may share the GPU.
VRAM_MARGIN_FRACTION = 0.05
VRAM_MARGIN_MIN = 512 * MiB

Size = int | str | None
"""A budget as ``procman.config`` parses it: bytes or ``"auto"``; None for no limit.
Other strings (``"8GiB"``) are read with :func:`procman._units.parse_size`."""


def _size(value: int | str, what: str) -> int:
    try:
        return parse_size(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what}: {exc}", hint='write a size such as "24GiB", or "auto"') from exc


@dataclass(frozen=True, kw_only=True)
class MachineMemory:
    """RAM and VRAM as the machine reports them now."""

    total_bytes: int
    available_bytes: int
    #: summed over NVIDIA GPUs (llama.cpp splits layers across all of them by default);
    #: None when NVML has no GPU to report
    vram_total_bytes: int | None = None
    vram_free_bytes: int | None = None
    vram_reason: str = ""
    gpus: tuple[GpuInfo, ...] = ()
    """Each NVIDIA GPU as NVML reported it (index, UUID, name, total and free)."""


def probe_machine(nvml: Any = None) -> MachineMemory:
    """psutil's memory figures and NVML's free VRAM; never raises."""
    import psutil  # speed

    from buildtools._nvidia import NO_DRIVER, nvidia_driver_loaded  # speed

    vm = psutil.virtual_memory()
    gpus: tuple[GpuInfo, ...] = ()
    reason = NO_DRIVER
    if nvml is not None or nvidia_driver_loaded():  # else spare the hardware layer's import
        from buildtools.hardware.cuda import probe_nvidia_gpus  # speed

        found = probe_nvidia_gpus(nvml)
        gpus, reason = found.gpus, found.reason
    return MachineMemory(
        total_bytes=int(vm.total),
        available_bytes=int(vm.available),
        vram_total_bytes=sum(g.memory_bytes or 0 for g in gpus) if gpus else None,
        vram_free_bytes=sum(g.memory_free_bytes or 0 for g in gpus) if gpus else None,
        vram_reason=reason,
        gpus=gpus,
    )


@dataclass(frozen=True, kw_only=True)
class Budget:
    """Bytes llamactl may commit to servers; None = not limited."""

    memory_bytes: int | None
    vram_bytes: int | None
    memory_reason: str = ""
    vram_reason: str = ""


def host_margin(total_bytes: int) -> int:
    """RAM an ``auto`` memory budget leaves to everything else on the machine."""
    return max(int(total_bytes * HOST_MARGIN_FRACTION), HOST_MARGIN_MIN)


def resolve_budget(memory: Size, vram: Size, machine: MachineMemory) -> Budget:
    """Turn budget settings into numbers, saying where each came from."""
    host_margin_bytes = host_margin(machine.total_bytes)
    if memory == "auto":
        mem = max(machine.available_bytes - host_margin_bytes, 0)
        mem_reason = (
            f"auto: {format_bytes(machine.available_bytes)} available "
            f"- {format_bytes(host_margin_bytes)} margin"
        )
    elif memory is None:
        mem, mem_reason = None, "no memory budget"
    else:
        mem = _size(memory, "memory_budget")
        mem_reason = f"memory_budget = {format_bytes(mem)}"
    if vram == "auto":
        if machine.vram_free_bytes is None or machine.vram_total_bytes is None:
            vrm: int | None = 0
            vram_reason = f"auto: no GPU memory to use ({machine.vram_reason or 'no GPU'})"
        else:
            margin = max(int(machine.vram_total_bytes * VRAM_MARGIN_FRACTION), VRAM_MARGIN_MIN)
            vrm = max(machine.vram_free_bytes - margin, 0)
            vram_reason = (
                f"auto: {format_bytes(machine.vram_free_bytes)} free "
                f"- {format_bytes(margin)} margin"
            )
    elif vram is None:
        vrm, vram_reason = None, "no VRAM budget"
    else:
        vrm = _size(vram, "vram_budget")
        vram_reason = f"vram_budget = {format_bytes(vrm)}"
    return Budget(
        memory_bytes=mem, vram_bytes=vrm, memory_reason=mem_reason, vram_reason=vram_reason
    )


@dataclass(frozen=True, kw_only=True)
class Need:
    """What a candidate server will hold: its estimate, host growth included."""

    host_bytes: int
    device_bytes: int
    devices: Mapping[str, int] = field(default_factory=dict)
    """Device bytes per GPU UUID, when the server is placed on GPUs
    (:mod:`procman.memory.devices`); empty: one pool."""
    device_limits: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    """Per GPU UUID: what this supervisor's servers may hold there together (free now plus
    what they hold, less a margin), and the card's name for messages."""

    @classmethod
    def of(cls, est: Estimate, *, memory_limit: int | None = None) -> Need:
        """The prompt cache and SWA checkpoints grow after start, so they are reserved too.

        A per-model ``memory_limit`` below the estimate is an error here rather
        than a restart loop later (enforcement would kill it every time).
        """
        host = est.host_bytes + est.host_growth_bytes
        if memory_limit is not None and host > memory_limit:
            raise OverBudget(
                "memory_limit", needed=host, free=memory_limit, budget=memory_limit, held_busy=0
            )
        return cls(host_bytes=host, device_bytes=est.device_bytes)


@dataclass(frozen=True, kw_only=True)
class Resident:
    """A server holding (or about to hold) memory."""

    name: str
    host_bytes: int
    device_bytes: int
    #: monotonic time of its last request (or of its start)
    last_used: float
    #: serving, starting, or already being evicted: not a candidate for eviction
    busy: bool
    #: device bytes per GPU UUID
    devices: Mapping[str, int] = field(default_factory=dict)


class OverBudget(AdmissionError):
    """A server does not fit; ``resource`` is ``memory``, ``vram`` or ``memory_limit``."""

    def __init__(
        self,
        resource: str,
        *,
        needed: int,
        free: int,
        budget: int,
        held_busy: int,
        name: str = "",
        device: str = "",
    ) -> None:
        who = f"{name!r} " if name else ""
        if resource == "memory_limit":
            message = (
                f"model {who}is estimated at {format_bytes(needed)}, above its "
                f"memory_limit of {format_bytes(budget)}"
            )
            hint = "raise memory_limit, or lower ctx/parallel/--cache-ram"
        elif device:
            message = (
                f"model {who}needs {format_bytes(needed)} of vram on {device}, "
                f"{format_bytes(free)} is free there of {format_bytes(budget)} usable"
            )
            if held_busy:
                message += f" ({format_bytes(held_busy)} held by busy servers)"
            hint = (
                "that GPU is full: pin the model to another one (devices = [N]), stop a model "
                'on it, use devices = "auto", or lower ctx/parallel/gpu_layers'
            )
        else:
            message = (
                f"model {who}needs {format_bytes(needed)} of {resource}, "
                f"{format_bytes(free)} is free of a {format_bytes(budget)} budget"
            )
            if held_busy:
                message += f" ({format_bytes(held_busy)} held by busy servers)"
            hint = f"raise {resource}_budget, stop a model, or lower ctx/parallel" + (
                "/gpu_layers" if resource == "vram" else ""
            )
        super().__init__(message, hint=hint)
        self.resource, self.needed, self.free, self.budget = resource, needed, free, budget
        self.held_busy = held_busy
        self.device = device


class Verdict(StrEnum):
    ADMIT = "admit"
    EVICT = "evict"
    """Admit after stopping ``Decision.evict``, oldest first."""
    REFUSE = "refuse"


@dataclass(frozen=True, kw_only=True)
class Decision:
    verdict: Verdict
    evict: tuple[str, ...] = ()
    reason: str
    error: OverBudget | None = None


def _host(r: Resident) -> int:
    return r.host_bytes


def _device(r: Resident) -> int:
    return r.device_bytes


def decide(name: str, need: Need, residents: Sequence[Resident], budget: Budget) -> Decision:
    """Admit, evict least recently used idle servers first, or refuse; pure."""
    limits: tuple[tuple[str, int, int | None, Callable[[Resident], int]], ...] = (
        ("memory", need.host_bytes, budget.memory_bytes, _host),
        ("vram", need.device_bytes, budget.vram_bytes, _device),
    )

    def shortfall(gone: set[str]) -> tuple[str, int, int, int, str] | None:
        # a card first: its name says more than the sum over cards
        for uuid, needed in need.devices.items() if budget.vram_bytes is not None else ():
            card_limit, label = need.device_limits.get(uuid, (None, ""))
            if card_limit is None or needed == 0:
                continue
            used = sum(r.devices.get(uuid, 0) for r in residents if r.name not in gone)
            if needed > card_limit - used:
                return "vram", needed, card_limit - used, card_limit, label
        for resource, needed, limit, held_by in limits:
            if limit is None or needed == 0:
                continue
            used = sum(held_by(r) for r in residents if r.name not in gone)
            if needed > limit - used:
                return resource, needed, limit - used, limit, ""
        return None

    first = shortfall(set())
    if first is None:
        return Decision(verdict=Verdict.ADMIT, reason=f"{name} fits the budget")
    where = f" on {first[4]}" if first[4] else ""
    gone: set[str] = set()
    evict: list[str] = []
    for r in sorted((r for r in residents if not r.busy), key=lambda r: r.last_used):
        gone.add(r.name)
        evict.append(r.name)
        if shortfall(gone) is None:
            return Decision(
                verdict=Verdict.EVICT,
                evict=tuple(evict),
                reason=f"{name} fits{where} after stopping idle {', '.join(evict)}",
            )
    missing = shortfall(gone)
    assert missing is not None  # noqa: S101 - the loop returned if evicting everything helped
    resource, needed, free, limit, device = missing
    held_by = _host if resource == "memory" else _device
    busy = sum(held_by(r) for r in residents if r.busy)
    if device:
        uuid = next(u for u, (_, label) in need.device_limits.items() if label == device)
        busy = sum(r.devices.get(uuid, 0) for r in residents if r.busy)
    error = OverBudget(
        resource, needed=needed, free=free, budget=limit, held_busy=busy, name=name, device=device
    )
    return Decision(verdict=Verdict.REFUSE, reason=str(error), error=error)


@dataclass
class _Entry:
    host_bytes: int
    device_bytes: int
    devices: dict[str, int] = field(default_factory=dict)
    measured: bool = False
    leaving: bool = False


@dataclass(kw_only=True)
class LedgerStats:
    admissions: int = 0
    evictions: int = 0
    refusals: int = 0


Activity = Callable[[str], tuple[float, bool]]
"""``name -> (last_used monotonic, busy)``; the supervisor knows both."""


@dataclass
class Reservation:
    """Held bytes for one server; ``with`` releases them if the block raises."""

    ledger: Ledger
    name: str
    decision: Decision
    released: bool = field(default=False)

    @property
    def evict(self) -> tuple[str, ...]:
        return self.decision.evict

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.ledger.release(self.name)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> Literal[False]:
        if exc_type is not None:
            self.release()
        return False


class Ledger:
    """Admitted and reserved servers against one budget; every method is atomic."""

    def __init__(self, budget: Budget, activity: Activity) -> None:
        self.budget = budget
        self._activity = activity
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self.stats = LedgerStats()

    def held(self) -> dict[str, tuple[int, int]]:
        """``name -> (host bytes, device bytes)`` currently counted."""
        with self._lock:
            return {n: (e.host_bytes, e.device_bytes) for n, e in self._entries.items()}

    def held_by_device(self, *, busy: bool = False) -> dict[str, int]:
        """Device bytes counted per GPU UUID, over every server placed on GPUs (``busy``:
        only those no eviction may stop: serving, starting or already leaving)."""
        with self._lock:
            held: dict[str, int] = {}
            for name, entry in self._entries.items():
                if busy and not (entry.leaving or self._activity(name)[1]):
                    continue
                for uuid, size in entry.devices.items():
                    held[uuid] = held.get(uuid, 0) + size
            return held

    def devices_of(self, name: str) -> dict[str, int]:
        """``name``'s device bytes per GPU UUID (empty: not placed, or not held)."""
        with self._lock:
            entry = self._entries.get(name)
            return dict(entry.devices) if entry is not None else {}

    def reserve(self, name: str, need: Need) -> Reservation:
        """Decide and hold ``need`` for ``name``; raises :class:`OverBudget` on refusal.

        Servers in ``evict`` stay counted (and are marked leaving, so no other
        reservation evicts them too) until the caller stops them and calls
        :meth:`release` for each.
        """
        with self._lock:
            if name in self._entries:
                raise AdmissionError(f"{name!r} already holds a reservation")
            residents = []
            for other, entry in self._entries.items():
                last_used, busy = self._activity(other)
                residents.append(
                    Resident(
                        name=other,
                        host_bytes=entry.host_bytes,
                        device_bytes=entry.device_bytes,
                        last_used=last_used,
                        busy=busy or entry.leaving,
                        devices=dict(entry.devices),
                    )
                )
            decision = decide(name, need, residents, self.budget)
            if decision.error is not None:
                self.stats.refusals += 1
                raise decision.error
            for other in decision.evict:
                self._entries[other].leaving = True
            self.stats.evictions += len(decision.evict)
            self.stats.admissions += 1
            self._entries[name] = _Entry(need.host_bytes, need.device_bytes, dict(need.devices))
            return Reservation(self, name, decision)

    def measure(
        self,
        name: str,
        host_bytes: int,
        device_bytes: int | None = None,
        by_device: Mapping[str, int] | None = None,
    ) -> None:
        """Count a measurement where it exceeds the estimate.

        Right after start RSS is below the estimate (weights are paged in
        lazily, compute buffers are touched by the first long prompt), so the
        estimate stays the floor: replacing it would let the next load in on
        memory this server is about to use.
        """
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return
            entry.host_bytes = max(entry.host_bytes, host_bytes)
            if device_bytes is not None:
                entry.device_bytes = max(entry.device_bytes, device_bytes)
            for uuid, size in (by_device or {}).items():
                if uuid in entry.devices:  # NVML lists only the cards the server was given
                    entry.devices[uuid] = max(entry.devices[uuid], size)
            entry.measured = True

    def release(self, name: str) -> None:
        with self._lock:
            self._entries.pop(name, None)
