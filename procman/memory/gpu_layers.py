"""How many layers to offload (``-ngl``), chosen from the model and the free VRAM.

llama-server's own default offloads everything it can name and then fails
with a CUDA out-of-memory error half way through loading when the card is
too small; a fixed number is wrong for the next model. ``auto`` therefore
asks :func:`procman.memory.estimate.estimate` what each ``-ngl`` would put on the
device (weights of the offloaded layers, their KV cache, the compute buffer,
the CUDA context) and takes the largest that leaves ``margin`` free. The
device bytes only grow with ``-ngl``, so a binary search over
``0..n_layers + 1`` needs a handful of estimates.

The choice always comes with its reason, for ``llamactl serve`` to print and
for the event log: a silent 0 ("the GPU is unused") is the most common
complaint about llama.cpp front-ends.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from procman._units import format_bytes
from procman.errors import ConfigError
from procman.memory.budget import VRAM_MARGIN_MIN
from procman.memory.estimate import estimate
from procman.models.gguf import ModelInfo

__all__ = ["DEFAULT_MARGIN", "LayerChoice", "LayerSetting", "choose_gpu_layers"]

#: VRAM left free by ``auto``: the CUDA context figure in the estimate is typical,
#: not measured, and the allocator needs slack (see procman.memory.budget)
DEFAULT_MARGIN = VRAM_MARGIN_MIN

LayerSetting = int | Literal["auto", "max", "all"]
"""``-ngl`` as configured: a number, ``auto`` (what fits), ``max``/``all`` (every layer)."""


class LayerChoice(NamedTuple):
    layers: int
    reason: str


def choose_gpu_layers(
    setting: LayerSetting,
    info: ModelInfo,
    *,
    free_vram_bytes: int | None,
    margin: int = DEFAULT_MARGIN,
    cap: int | None = None,
    ctx: int = 0,
    parallel: int | None = 1,
    **estimate_args: Any,
) -> LayerChoice:
    """The ``-ngl`` to pass and why.

    ``free_vram_bytes`` is what NVML reports free now (None: no GPU, or a
    CPU-only build: nothing is offloaded). ``cap`` bounds ``auto`` (a
    configured maximum). ``ctx``, ``parallel`` and ``estimate_args`` are the
    server's other flags, as :func:`~procman.memory.estimate.estimate` takes them:
    the KV cache of an offloaded layer lives on the device too.
    """
    full = info.n_layers + 1  # the repeating layers plus the output layer

    def device_bytes(ngl: int) -> int:
        est = estimate(info, ctx=ctx, parallel=parallel, gpu_layers=ngl, **estimate_args)
        return est.device_bytes

    def fit_note(ngl: int) -> str:
        need = device_bytes(ngl)
        if free_vram_bytes is None:
            return f"needs ~{format_bytes(need)} VRAM; free VRAM unknown"
        verdict = "fits" if need + margin <= free_vram_bytes else "may NOT fit"
        return f"needs ~{format_bytes(need)}, {format_bytes(free_vram_bytes)} free: {verdict}"

    match setting:
        case "max" | "all":
            return LayerChoice(full, f"all {full} layers offloaded ({setting}); {fit_note(full)}")
        case int() as n if n >= 0:
            layers = min(n, full)
            capped = f" (the model has {full})" if n > full else ""
            return LayerChoice(layers, f"{layers} layers as configured{capped}; {fit_note(layers)}")
        case "auto":
            pass
        case _:
            raise ConfigError(f"gpu_layers must be a number, 'auto' or 'max', not {setting!r}")

    if free_vram_bytes is None:
        return LayerChoice(0, "auto: no GPU memory reported (no NVIDIA GPU or NVML): CPU only")
    usable = free_vram_bytes - margin
    top = full if cap is None else max(0, min(cap, full))
    if usable <= 0 or device_bytes(1) > usable:
        return LayerChoice(
            0,
            f"auto: 0 layers; {format_bytes(free_vram_bytes)} free VRAM minus "
            f"{format_bytes(margin)} margin leaves no room even for the output layer "
            f"(~{format_bytes(device_bytes(1))})",
        )
    lo, hi = 1, top  # device_bytes(lo) fits; find the largest that does
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if device_bytes(mid) <= usable:
            lo = mid
        else:
            hi = mid - 1
    why = "all layers fit" if lo == full else f"capped at {cap}" if lo == top else "what fits"
    return LayerChoice(
        lo,
        f"auto: {lo}/{full} layers ({why}); ~{format_bytes(device_bytes(lo))} of "
        f"{format_bytes(free_vram_bytes)} free VRAM, {format_bytes(margin)} kept free",
    )
