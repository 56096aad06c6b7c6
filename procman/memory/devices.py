"""Which GPUs a model runs on, when a machine has several: placement, pinning and splits.

llama-server left alone takes every visible GPU and splits the layers by each
card's free memory, so two models land on the same card, and one that fits a
single card still pays a CUDA context on each. Here each start is *placed*
when it is admitted, against what each card has left:

* ``devices = "auto"``: the fewest cards that hold the model, the roomiest
  first (one card if one is enough), so several models pack onto separate
  cards without overcommitting any; if no set of cards holds it all, every card.
* a list of NVML indices or UUIDs: exactly those (pinning).
* ``"all"``: every card, split.

A card's room is what NVML reports free now, plus what this supervisor's own
servers hold there (they could be evicted), less a margin; the ledger then
subtracts what those servers hold and refuses (naming the card) or evicts.
GPUs are probed again at every placement, so a card that has gone away is
never chosen, and a model pinned to it is refused with its name.

The server then sees only its cards (``CUDA_VISIBLE_DEVICES`` by UUID, in the
placement's order), so a restart or a neighbour never moves it; across several
cards ``-ts`` gives each a share of the layers in proportion to its room after
its fixed costs, and the per-card totals follow llama.cpp's assignment of
layers (src/llama-model.cpp: offloaded layer ``il`` goes to the device whose
cumulative share first exceeds ``(il - i_gpu_start) / n_offloaded``).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from procman._units import format_bytes
from procman.errors import AdmissionError
from procman.memory.estimate import MiB, estimate
from procman.spec import DeviceSetting

if TYPE_CHECKING:
    from buildtools.hardware import GpuInfo
    from procman.models.gguf import ModelInfo

__all__ = [
    "Card",
    "DeviceSetting",
    "Placement",
    "cards_from",
    "device_margin",
    "parse_devices",
    "place",
    "split_totals",
]


#: a card's margin: this share of its memory, at least 512 MiB (as the VRAM budget's)
_MARGIN_FRACTION = 0.05
_MARGIN_MIN = 512 * MiB


def device_margin(total: int) -> int:
    """Memory kept free on a card: the CUDA overhead in the estimate is typical, not measured."""
    return max(int(total * _MARGIN_FRACTION), _MARGIN_MIN)


def parse_devices(value: Any) -> DeviceSetting:
    """The config value: ``"auto"``, ``"all"``, or a non-empty list of indices and UUIDs."""
    match value:
        case "auto" | "all":
            return value  # type: ignore[no-any-return]  # narrowed by the pattern
        case list() if value and all(_is_device(v) for v in value):
            if len(set(value)) != len(value):
                raise ValueError(f"lists a GPU twice: {value!r}")
            return tuple(value)
    raise ValueError(
        f'expected "auto", "all" or a list of GPU indices or UUIDs such as [0, 1], got {value!r}'
    )


def _is_device(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return (isinstance(value, int) and value >= 0) or (
        isinstance(value, str) and value.startswith(("GPU-", "MIG-"))
    )


@dataclass(frozen=True, kw_only=True)
class Card:
    """One GPU as a placement sees it."""

    index: int
    """NVML's index (PCI bus order)."""
    uuid: str
    name: str
    total: int
    free: int
    """What NVML reports free now."""
    ours: int = 0
    """What this supervisor's servers hold on it (their reservations or measurements)."""
    baseline: int | None = None
    """What NVML reported free when the supervisor started (None: the card is new since)."""
    busy: int = 0
    """The part of ``ours`` held by servers that cannot be evicted now (serving, starting)."""

    @property
    def limit(self) -> int:
        """What our servers may hold here together: free now plus ours, never more than
        was free at the start (a reservation not yet allocated is not in NVML's figure),
        less the margin."""
        cap = self.total if self.baseline is None else min(self.baseline, self.total)
        return max(min(self.free + self.ours, cap) - device_margin(self.total), 0)

    @property
    def room(self) -> int:
        """What a new server may take here without evicting anything."""
        return max(self.limit - self.ours, 0)

    @property
    def room_after_evicting(self) -> int:
        """What a new server could take here once the idle servers on it stop."""
        return max(self.limit - self.busy, 0)

    @property
    def label(self) -> str:
        return f"GPU {self.index} ({self.name}, {self.uuid})"


def cards_from(
    gpus: Sequence[GpuInfo],
    ours: Mapping[str, int] | None = None,
    baseline: Sequence[GpuInfo] = (),
    busy: Mapping[str, int] | None = None,
) -> list[Card]:
    """NVML's GPUs (``probe_nvidia_gpus``) with what our servers hold on each, by UUID
    (``busy``: the part no eviction may free); ``baseline``: the same probe when the
    supervisor started."""
    ours, busy = ours or {}, busy or {}
    first = {g.uuid: g.memory_free_bytes for g in baseline}
    cards = []
    for g in gpus:
        uuid = g.uuid or f"GPU-index-{g.index}"
        cards.append(
            Card(
                index=g.index,
                uuid=uuid,
                name=g.name,
                total=g.memory_bytes or 0,
                free=g.memory_free_bytes or 0,
                ours=ours.get(uuid, 0),
                baseline=first.get(g.uuid),
                busy=busy.get(uuid, 0),
            )
        )
    return cards


@dataclass(frozen=True, kw_only=True)
class Placement:
    """The cards a server runs on, what it will hold on each, and why."""

    cards: tuple[Card, ...]
    device_bytes: tuple[int, ...]
    """The estimate on each card, in the order of ``cards``."""
    shares: tuple[float, ...] = ()
    """``-ts`` over ``cards``; empty on one card."""
    reason: str = ""
    layers: int = 0
    """The ``-ngl`` the per-card figures assume."""
    fits: bool = True
    notes: tuple[str, ...] = field(default=())

    @property
    def uuids(self) -> tuple[str, ...]:
        return tuple(c.uuid for c in self.cards)

    def by_uuid(self) -> dict[str, int]:
        return dict(zip(self.uuids, self.device_bytes, strict=True))

    def to_json(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "reason": self.reason,
            "tensor_split": list(self.shares),
            "devices": [
                {
                    "index": c.index,
                    "uuid": c.uuid,
                    "name": c.name,
                    "bytes": b,
                    "free": c.free,
                    "room": c.room,
                    "fits": b <= c.room,
                }
                for c, b in zip(self.cards, self.device_bytes, strict=True)
            ],
        }


def _layer_cards(n_layer: int, layers: int, shares: Sequence[float]) -> list[int | None]:
    """The card of each layer ``0..n_layer`` (the last: the output layer); None: the host."""
    total = sum(shares)
    points, running = [], 0.0
    for share in shares:
        running += share
        points.append(running / total)
    act = min(layers, n_layer + 1)
    start = n_layer + 1 - act
    return [
        None
        if il < start
        else min(bisect.bisect_right(points, (il - start) / act), len(shares) - 1)
        for il in range(n_layer + 1)
    ]


def split_totals(
    info: ModelInfo, shares: Sequence[float], *, layers: int, **settings: Any
) -> tuple[int, ...]:
    """Bytes on each card when ``layers`` (``-ngl``) are split by ``shares``.

    A layer's weights and KV cache are the difference of two single-device
    estimates (one layer more offloaded), so a split and the one-card estimate
    never disagree; each card also holds its own compute buffer and CUDA context.
    """
    n = info.n_layers
    layers = min(max(layers, 0), n + 1)
    steps = [estimate(info, gpu_layers=k, **settings) for k in range(layers + 1)]

    def part(k: int) -> int:
        b = steps[k].breakdown
        return b["weights"]["device"] + b["kv_cache"]["device"]

    # -ngl 1 offloads the output layer, each further step the next repeating layer from the top
    cost = {n + 1 - k if k > 1 else n: part(k) - part(k - 1) for k in range(1, layers + 1)}
    full = steps[layers].breakdown
    fixed = full["compute"]["device"] + full["overhead"]["device"]
    totals = [0] * len(shares)
    for il, card in enumerate(_layer_cards(n, layers, shares)):
        if card is not None:
            totals[card] += cost.get(il, 0)
    if len(shares) == 1:
        return (steps[layers].device_bytes,)
    return tuple(t + fixed for t in totals)


def _shares(cards: Sequence[Card], fixed: int) -> tuple[float, ...]:
    """Each card's room after its fixed costs, in MiB: llama.cpp normalises ``-ts`` itself."""
    room = [max(c.room - fixed, 0) // MiB for c in cards]
    if not any(room):
        return tuple(1.0 for _ in cards)
    return tuple(float(r) for r in room)


def _fixed(info: ModelInfo, layers: int, **settings: Any) -> int:
    b = estimate(info, gpu_layers=layers, **settings).breakdown
    return b["compute"]["device"] + b["overhead"]["device"]


def _on(
    info: ModelInfo, cards: Sequence[Card], layers: int, reason: str, **settings: Any
) -> Placement:
    shares = _shares(cards, _fixed(info, layers, **settings)) if len(cards) > 1 else ()
    totals = split_totals(info, shares or (1.0,), layers=layers, **settings)
    fits = all(b <= c.room for c, b in zip(cards, totals, strict=True))
    per = ", ".join(
        f"GPU {c.index} ~{format_bytes(b)} of {format_bytes(c.room)} room"
        for c, b in zip(cards, totals, strict=True)
    )
    split = (" split " + ":".join(f"{s:g}" for s in shares)) if shares else ""
    return Placement(
        cards=tuple(cards),
        device_bytes=totals,
        shares=shares,
        reason=f"{reason}{split} ({per})",
        layers=layers,
        fits=fits,
    )


def _pinned(setting: tuple[int | str, ...], cards: Sequence[Card]) -> list[Card]:
    chosen = []
    for want in setting:
        match = [c for c in cards if (c.index == want if isinstance(want, int) else c.uuid == want)]
        if not match:
            seen = ", ".join(f"{c.index} ({c.uuid})" for c in cards) or "none"
            raise AdmissionError(
                f"devices lists GPU {want!r}, which NVML does not report now (GPUs seen: {seen})",
                hint="the card may have been removed or reset: pin the model to a GPU that "
                'llamactl detect lists, or use devices = "auto"',
            )
        chosen.append(match[0])
    return chosen


def place(
    setting: DeviceSetting, info: ModelInfo, cards: Sequence[Card], *, layers: int, **settings: Any
) -> Placement:
    """The cards for a server offloading ``layers`` (``-ngl``); ``settings`` are the estimate's.

    Raises :class:`~procman.errors.AdmissionError` when a pinned GPU is not there.
    Whether it *fits* is for the ledger to decide (and refuse, naming the card).
    """
    if not cards:
        raise AdmissionError(
            "no NVIDIA GPU to place the model on (NVML reports none now)",
            hint='drop devices, or set gpu_layers = 0 to run it on the CPU; "llamactl detect" '
            "lists the GPUs",
        )
    match setting:
        case "all":
            return _on(info, cards, layers, f"devices all: {len(cards)} GPUs", **settings)
        case tuple():
            chosen = _pinned(setting, cards)
            which = ", ".join(str(c.index) for c in chosen)
            return _on(info, chosen, layers, f"devices pinned to GPU {which}", **settings)
        case "auto":
            pass
    roomiest = sorted(cards, key=lambda c: (-c.room, c.index))
    for k in range(1, len(roomiest) + 1):
        chosen = sorted(roomiest[:k], key=lambda c: c.index)
        why = (
            f"auto: GPU {chosen[0].index}, the one with the most room"
            if k == 1
            else f"auto: {k} GPUs, the fewest that hold it"
        )
        placement = _on(info, chosen, layers, why, **settings)
        if placement.fits:
            return placement
    # no card has room now: the fewest that would once idle servers on them stop
    # (the ledger then evicts them), rather than every card
    by_evicting = sorted(cards, key=lambda c: (-c.room_after_evicting, c.index))
    for k in range(1, len(by_evicting) + 1):
        chosen = sorted(by_evicting[:k], key=lambda c: c.index)
        which = ", ".join(str(c.index) for c in chosen)
        placement = _on(
            info, chosen, layers, f"auto: GPU {which} once idle models stop", **settings
        )
        if all(
            b <= c.room_after_evicting for c, b in zip(chosen, placement.device_bytes, strict=True)
        ):
            return placement
    return _on(info, sorted(cards, key=lambda c: c.index), layers,
               f"auto: no set of GPUs holds it, all {len(cards)}", **settings)  # fmt: skip
