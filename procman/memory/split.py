"""How a model splits across RPC workers' devices: per device, the layers it holds and the
bytes they take (weights, KV cache, compute), and whether that fits its free memory.

It follows llama.cpp b11312's own placement (src/llama-model.cpp ``load_tensors``
and src/llama.cpp): RPC devices come first in the device list; with ``-ngl all``
layer ``il`` goes to the first device whose cumulative share of the normalised
``-ts`` split exceeds ``il / (n_layer + 1)``, the output layer is placed as layer
``n_layer``, and the input embeddings stay on the leader's CPU. Without ``-ts``
llama.cpp splits by each device's free memory, blind to what a layer costs;
:func:`auto_shares` instead gives each device a share of what it has left after
its fixed costs (compute buffer, margin), so that no device is filled past its
free memory while another has room.

Per-layer sizes come from :func:`procman.memory.estimate.estimate` itself, as
the difference between offloading the last *k* and *k - 1* layers, so the split
and the single-machine estimate can never disagree.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from procman.memory.estimate import Estimate, estimate
from procman.models.gguf import ModelInfo

__all__ = [
    "WORKER_MARGIN",
    "DeviceShare",
    "SplitPlan",
    "auto_shares",
    "layer_devices",
    "plan_split",
]

MiB = 1024 * 1024
#: kept free on each worker device beyond the estimate: the worker process, its
#: graph bookkeeping and ggml's alignment (a CPU worker's own RSS is ~20 MiB)
WORKER_MARGIN = 64 * MiB


@dataclass(frozen=True, kw_only=True)
class DeviceShare:
    """One device's part of the model."""

    endpoint: str
    index: int
    """The device's position in llama.cpp's list (``RPC<index>``)."""
    layers: tuple[int, ...]
    output: bool
    """Whether the output layer (the vocabulary head) is on this device."""
    weights: int
    kv_cache: int
    compute: int
    margin: int
    free: int | None
    """Free memory the worker reported; None when it was not probed."""

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.margin

    @property
    def fits(self) -> bool:
        return self.free is None or self.total <= self.free

    def to_json(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "device": f"RPC{self.index}",
            "layers": [self.layers[0], self.layers[-1]] if self.layers else [],
            "n_layers": len(self.layers),
            "output": self.output,
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "compute": self.compute,
            "margin": self.margin,
            "total": self.total,
            "free": self.free,
            "fits": self.fits,
        }


@dataclass(frozen=True, kw_only=True)
class SplitPlan:
    devices: tuple[DeviceShare, ...]
    host_bytes: int
    """What the leader itself holds: input embeddings, logits, its compute buffer, overhead."""
    shares: tuple[float, ...]
    """The ``-ts`` values that give this placement."""

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)

    def to_json(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "tensor_split": list(self.shares),
            "leader_host_bytes": self.host_bytes,
            "devices": [d.to_json() for d in self.devices],
        }


def layer_devices(n_layer: int, shares: tuple[float, ...]) -> list[int]:
    """The device index of each layer ``0..n_layer`` (the last one: the output layer),
    everything offloaded, as llama.cpp assigns them."""
    cumulative, running = [], 0.0
    for share in shares:
        running += share
        cumulative.append(running)
    points = [c / running for c in cumulative]
    act = n_layer + 1
    return [
        min(bisect.bisect_right(points, il / act), len(shares) - 1) for il in range(n_layer + 1)
    ]


def _per_layer(info: ModelInfo, **settings: Any) -> tuple[list[tuple[int, int]], Estimate]:
    """(weights, kv) on the device for each layer 0..n_layer (output last), and the full
    offload's estimate, by differences of the single-machine estimate."""
    n = info.n_layers
    device = [estimate(info, gpu_layers=k, **settings) for k in range(n + 2)]

    def part(est: Estimate, name: str) -> int:
        return est.breakdown[name]["device"]

    costs: list[tuple[int, int]] = [(0, 0)] * (n + 1)
    # -ngl 1 offloads the output layer; each further step one more repeating layer, from the top
    costs[n] = (part(device[1], "weights"), part(device[1], "kv_cache"))
    for k in range(2, n + 2):
        il = n + 1 - k
        costs[il] = (
            part(device[k], "weights") - part(device[k - 1], "weights"),
            part(device[k], "kv_cache") - part(device[k - 1], "kv_cache"),
        )
    return costs, device[n + 1]


def auto_shares(
    info: ModelInfo, free: Sequence[int], *, margin: int = WORKER_MARGIN, **settings: Any
) -> tuple[float, ...]:
    """``-ts`` shares that give each device layers in proportion to the memory it has left
    after its compute buffer and margin (see the module docstring)."""
    full = estimate(info, gpu_layers=-1, **settings)
    fixed = full.breakdown["compute"]["device"] + margin
    room = [max(f - fixed, 0) for f in free]
    if not any(room):
        return tuple(1.0 for _ in free)  # nothing fits anywhere: an even split, reported unfit
    return tuple(float(r // MiB) for r in room)


def plan_split(
    info: ModelInfo,
    endpoints: list[str],
    *,
    free: Sequence[int | None] | None = None,
    shares: tuple[float, ...] | None = None,
    margin: int = WORKER_MARGIN,
    **settings: Any,
) -> SplitPlan:
    """Place ``info`` across one device per endpoint (``free``: what each reported).

    ``shares`` None: :func:`auto_shares` when every ``free`` is known, else an even
    split. ``settings`` are :func:`~procman.memory.estimate.estimate`'s (ctx, parallel,
    cache types, ...).
    """
    settings.pop("gpu_layers", None)
    free = list(free) if free is not None else [None] * len(endpoints)
    if shares is None:
        known = [f for f in free if f is not None]
        shares = (
            auto_shares(info, known, margin=margin, **settings)
            if len(known) == len(endpoints)
            else tuple(1.0 for _ in endpoints)
        )
    if len(shares) != len(endpoints):
        from procman.errors import ConfigError  # speed

        raise ConfigError(
            f"--tensor-split has {len(shares)} values for {len(endpoints)} RPC devices",
            hint="give one share per worker, in the order of --rpc",
        )
    costs, full = _per_layer(info, **settings)
    placement = layer_devices(info.n_layers, shares)
    compute = full.breakdown["compute"]["device"]
    devices = []
    for index, endpoint in enumerate(endpoints):
        mine = [il for il, dev in enumerate(placement) if dev == index]
        layers = tuple(il for il in mine if il < info.n_layers)
        devices.append(
            DeviceShare(
                endpoint=endpoint,
                index=index,
                layers=layers,
                output=info.n_layers in mine,
                weights=sum(costs[il][0] for il in mine),
                kv_cache=sum(costs[il][1] for il in mine),
                # each device reserves a graph for its own part; a device with no layer none
                compute=compute if mine else 0,
                margin=margin,
                free=free[index],
            )
        )
    return SplitPlan(devices=tuple(devices), host_bytes=full.host_bytes, shares=shares)
