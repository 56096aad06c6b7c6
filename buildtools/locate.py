"""Which llama-server ``llamactl serve`` runs, in one documented order.

1. an explicit path (``--server PATH``), then ``$LLAMACTL_SERVER``;
2. the newest verified cached build that suits this machine (its CPU
   features are all usable here, its GPU backend has a GPU), builds made for
   this machine before portable ones;
3. the server bundled in the installed wheel (``buildtools/bin/``);
4. ``llama-server`` on ``PATH``;
5. when allowed, a fresh ``llamactl build`` with the default plan.

:func:`resolve_worker` finds ``ggml-rpc-server`` (``llamactl worker``) in the
same order: ``--server``, ``$LLAMACTL_RPC_SERVER``, a usable cached build that
has one, the wheel, ``PATH``, a build.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from buildtools import paths
from buildtools.cache import BuildCache, CachedBuild
from buildtools.errors import CacheError
from buildtools.wheel import bundled_server

if TYPE_CHECKING:
    from buildtools.builder import ProgressCallback
    from buildtools.cancel import CancelToken

__all__ = [
    "RPC_WORKER",
    "Candidate",
    "ResolvedServer",
    "candidates",
    "resolve_server",
    "resolve_worker",
]

RPC_WORKER = "ggml-rpc-server"


@dataclass(frozen=True, kw_only=True)
class ResolvedServer:
    binary: Path
    origin: str
    """``explicit``, ``env``, ``cache``, ``bundled``, ``path`` or ``built``."""
    reason: str
    build: CachedBuild | None = None


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """A cached build and whether it may serve on this machine."""

    build: CachedBuild
    usable: bool
    reason: str


def _usable_cpu_features() -> frozenset[str]:
    from buildtools.hardware import detect_cpu

    return frozenset(detect_cpu().features)


def candidates(
    home: Path | None = None, *, cpu_features: Callable[[], frozenset[str]] | None = None
) -> list[Candidate]:
    """Every cached build with whether it suits this machine, best first.

    Builds made for this machine rank before portable ones (a portable build
    is for shipping, and picks its CPU variant at run time); within each
    group, newest first.
    """
    builds = sorted(BuildCache(home or paths.home()).list(), key=lambda b: b.portable)
    if not builds:
        return []
    have = (cpu_features or _usable_cpu_features)()
    # a full probe (NVML, loaders) costs ~0.3 s: run it once, only if a GPU build is cached
    usable_backends = functools.cache(_usable_backends)
    out = []
    for b in builds:
        missing = sorted(set(b.cpu_features) - have)
        if not b.verified:
            out.append(Candidate(build=b, usable=False, reason="never verified on this machine"))
        elif missing:
            out.append(
                Candidate(
                    build=b, usable=False, reason=f"needs {', '.join(missing)}, not usable here"
                )
            )
        elif b.backend not in {"cpu", "metal"} and b.backend not in usable_backends():
            out.append(
                Candidate(
                    build=b, usable=False, reason=f"{b.backend} build but no such GPU is usable now"
                )
            )
        else:
            out.append(
                Candidate(build=b, usable=True, reason=f"verified {b.backend} build {b.version}")
            )
    return out


def _usable_backends() -> set[str]:
    from buildtools.hardware import detect

    return {str(b) for b, status in detect().backends.items() if status.available}


def resolve_server(
    explicit: str | os.PathLike[str] | None = None,
    *,
    build_if_missing: bool = False,
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
    on_progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> ResolvedServer:
    """The llama-server to run (see the module docstring for the order)."""
    env = os.environ if env is None else env
    for origin, value in (("explicit", explicit), ("env", env.get("LLAMACTL_SERVER"))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file() or not os.access(path, os.X_OK):
                where = "--server" if origin == "explicit" else "$LLAMACTL_SERVER"
                raise CacheError(f"{where} {path} is not an executable file")
            return ResolvedServer(binary=path, origin=origin, reason=f"given as {origin}")
    for cand in candidates(home):
        if cand.usable:
            return ResolvedServer(
                binary=cand.build.binary,
                origin="cache",
                reason=f"newest {cand.reason}",
                build=cand.build,
            )
    if bundled := bundled_server():
        return ResolvedServer(
            binary=bundled, origin="bundled", reason="bundled in the installed wheel"
        )
    if on_path := shutil.which("llama-server", path=env.get("PATH")):
        return ResolvedServer(
            binary=Path(on_path), origin="path", reason="llama-server found on PATH"
        )
    if build_if_missing:
        from buildtools import build_default

        result = build_default(home=home, on_progress=on_progress, cancel=cancel)
        return ResolvedServer(
            binary=result.build.binary,
            origin="built",
            reason="built now (no usable build was cached)",
            build=result.build,
        )
    raise CacheError(
        "no llama-server is available: none is cached for this machine and none is on PATH",
        hint="run `llamactl build` (about 10 minutes on 2 cores, once), or pass --server PATH",
    )


def resolve_worker(
    explicit: str | os.PathLike[str] | None = None,
    *,
    build_if_missing: bool = False,
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
    on_progress: ProgressCallback | None = None,
) -> ResolvedServer:
    """The ``ggml-rpc-server`` to run (see the module docstring for the order)."""
    env = os.environ if env is None else env
    for origin, value in (("explicit", explicit), ("env", env.get("LLAMACTL_RPC_SERVER"))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file() or not os.access(path, os.X_OK):
                where = "--server" if origin == "explicit" else "$LLAMACTL_RPC_SERVER"
                raise CacheError(f"{where} {path} is not an executable file")
            return ResolvedServer(binary=path, origin=origin, reason=f"given as {origin}")
    for cand in candidates(home):
        if cand.usable and cand.build.rpc_worker.is_file():
            return ResolvedServer(
                binary=cand.build.rpc_worker,
                origin="cache",
                reason=f"newest {cand.reason}",
                build=cand.build,
            )
    bundled = bundled_server()
    if bundled is not None and (worker := bundled.with_name(RPC_WORKER)).is_file():
        return ResolvedServer(binary=worker, origin="bundled", reason="bundled in the wheel")
    if on_path := shutil.which(RPC_WORKER, path=env.get("PATH")):
        return ResolvedServer(binary=Path(on_path), origin="path", reason=f"{RPC_WORKER} on PATH")
    if build_if_missing:
        from buildtools import build_default

        result = build_default(home=home, on_progress=on_progress)
        return ResolvedServer(
            binary=result.build.rpc_worker,
            origin="built",
            reason="built now (no cached build had one)",
            build=result.build,
        )
    raise CacheError(
        f"no {RPC_WORKER} is available: no cached build has one and none is on PATH",
        hint="run `llamactl build` (builds with GGML_RPC=ON now), or pass --server PATH",
    )
