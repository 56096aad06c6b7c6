"""``--rpc`` for ``serve`` and ``estimate``: the workers, checked, and the split."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.markup import escape

from buildtools.errors import LlamactlError
from procman.cli._app import console

if TYPE_CHECKING:
    from procman.memory.split import SplitPlan
    from procman.models.gguf import ModelInfo

__all__ = ["check_endpoints", "checked_rpc", "rpc_fields", "rpc_group", "split_for"]


def check_endpoints(text: str | list[str], *, trusted: bool) -> tuple[str, ...]:
    """Parse the workers; refuse non-loopback ones unless the network is trusted."""
    from procman.distributed.rpc import DEADLOCK_NOTE, is_loopback, parse_endpoints  # speed

    endpoints = parse_endpoints(text)
    remote = [e for e in endpoints if not is_loopback(e)]
    if remote and not trusted:
        raise LlamactlError(
            f"RPC worker {remote[0]} is beyond this machine, and the RPC protocol has no "
            "authentication: anyone on the path can read the model and what it computes",
            hint="only on a network you trust (a direct cable, a private VLAN): pass "
            "--trusted-network (in a config: trusted_network = true in [workers.NAME])",
        )
    if len(endpoints) > 2:
        console.print(f"[yellow]warning:[/] {DEADLOCK_NOTE}")
    return endpoints


def _shares(text: str | None, count: int) -> tuple[float, ...] | None:
    """``1,3`` -> (1.0, 3.0); None/``auto`` -> None (computed)."""
    if text is None or text.strip().lower() == "auto":
        return None
    try:
        shares = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise LlamactlError(
            f"--tensor-split {text!r}: expected numbers such as 1,3 or auto"
        ) from None
    if len(shares) != count or min(shares) < 0 or sum(shares) <= 0:
        raise LlamactlError(
            f"--tensor-split {text!r}: give {count} non-negative shares, not all zero",
            hint="one per worker, in the order of --rpc; or auto",
        )
    return shares


def split_for(
    info: ModelInfo, endpoints: tuple[str, ...], shares_text: str | None, **settings: Any
) -> tuple[SplitPlan, list[Any]]:
    """Probe the workers and plan the split; raises if one does not answer."""
    from procman._loop import run as run_loop  # speed
    from procman.distributed.rpc import probe_all  # speed
    from procman.memory.split import plan_split  # speed

    probes = run_loop(probe_all(endpoints))
    for found in probes:
        if not found.usable:
            raise LlamactlError(
                f"RPC worker {found.endpoint}: {found.error}",
                hint="start it with `llamactl worker` on its machine; "
                "`llamactl workers HOST:PORT` shows what answers",
            )
    free = [p.free for p in probes]
    shares = _shares(shares_text, len(endpoints))
    return plan_split(info, list(endpoints), free=free, shares=shares, **settings), probes


def rpc_group(
    rpc: str,
    tensor_split: str | None,
    *,
    info: ModelInfo,
    ctx: int | None,
    parallel: int | None,
    stall_timeout: float,
) -> dict[str, Any]:
    """The ServerSpec fields of an RPC group, ``--tensor-split auto`` resolved."""
    from procman.distributed.rpc import parse_endpoints  # speed

    endpoints = parse_endpoints(rpc)  # checked (and warned about) by check_endpoints
    shares = _shares(tensor_split, len(endpoints))
    if tensor_split is not None and shares is None:  # auto: from the estimate and free memory
        plan, _ = split_for(info, endpoints, None, ctx=ctx or 0, parallel=parallel or 1)
        shares = plan.shares
        placed = ", ".join(
            f"{d.endpoint}: {len(d.layers)} layers{' + output' if d.output else ''}"
            for d in plan.devices
        )
        console.print(f"[dim]tensor split (auto):[/] {escape(placed)}")
        if not plan.fits:
            raise LlamactlError(
                "the model does not fit on these workers; see `llamactl estimate MODEL --rpc "
                f"{','.join(endpoints)}`",
                hint="add a worker, lower --ctx, or use a smaller quantisation",
            )
    return {"rpc": endpoints, "tensor_split": shares or (), "stall_timeout": stall_timeout}


def checked_rpc(rpc: str | None, *, trusted: bool) -> str | None:
    """``--rpc``, parsed and checked (loopback unless the network is trusted); None: none."""
    if rpc is None:
        return None
    return ",".join(check_endpoints(rpc, trusted=trusted))


def rpc_fields(
    resolved: Any,
    rpc: str | None,
    tensor_split: str | None,
    info: Any,
    ctx: int | None,
    parallel: int | None,
    stall_timeout: float,
) -> dict[str, Any]:
    """The ServerSpec fields for ``--rpc`` (none without it), after checking that the
    server can use RPC workers (a cached build without GGML_RPC cannot)."""
    if rpc is None:
        if tensor_split is not None:
            raise LlamactlError("--tensor-split needs --rpc", hint="e.g. --rpc 127.0.0.2:50052")
        return {}
    build = resolved.build
    defines = build.manifest.get("plan", {}).get("cmake_defines", {}) if build else {}
    if build is not None and defines.get("GGML_RPC") != "ON":
        raise LlamactlError(
            f"the llama-server in use ({build.key}) was built without RPC support",
            hint="run `llamactl build` (every plan sets GGML_RPC=ON now), then serve again",
        )
    return rpc_group(
        rpc,
        tensor_split,
        info=info,
        ctx=ctx,
        parallel=parallel,
        stall_timeout=stall_timeout,
    )
