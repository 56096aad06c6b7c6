"""Build llama.cpp's server for this machine: detect, plan, compile, verify, cache.

The flow, each step a value you can print and test::

    detect() -> HardwareProfile --make_plan(options)--> BuildPlan
    provision() -> SourceTree
    build(profile, options, source) -> BuildResult (a verified CachedBuild)
    resolve_server() -> ResolvedServer (what `llamactl serve` runs)
"""

from __future__ import annotations

from buildtools.errors import (
    BuildCancelled,
    BuildError,
    CacheError,
    DownloadError,
    LlamactlError,
    PlanError,
    SourceError,
    ToolchainError,
    VerificationError,
)

#: pathlib and typing cost ~20 ms to import, and this package's ``_ports`` runs in
#: ``llamactl serve``'s early start: nothing heavy here (mypy reads this as typing's)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from buildtools.builder import BuildProgress, BuildResult, ProgressCallback, build
    from buildtools.cache import BuildCache, CachedBuild
    from buildtools.cancel import CancelToken
    from buildtools.locate import (
        Candidate,
        ResolvedServer,
        candidates,
        resolve_server,
        resolve_worker,
    )
    from buildtools.plan import BuildOptions, BuildPlan, make_plan
    from buildtools.source import SourceTree, provision

#: public name -> defining module, imported on first access so that importing
#: an error class (as procman does) costs microseconds, not the build layer
_LAZY = {
    "BuildProgress": "buildtools.builder",
    "BuildResult": "buildtools.builder",
    "ProgressCallback": "buildtools.builder",
    "build": "buildtools.builder",
    "BuildCache": "buildtools.cache",
    "CachedBuild": "buildtools.cache",
    "CancelToken": "buildtools.cancel",
    "Candidate": "buildtools.locate",
    "ResolvedServer": "buildtools.locate",
    "candidates": "buildtools.locate",
    "resolve_server": "buildtools.locate",
    "resolve_worker": "buildtools.locate",
    "BuildOptions": "buildtools.plan",
    "BuildPlan": "buildtools.plan",
    "make_plan": "buildtools.plan",
    "SourceTree": "buildtools.source",
    "provision": "buildtools.source",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'buildtools' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "BuildCache",
    "BuildCancelled",
    "BuildError",
    "BuildOptions",
    "BuildPlan",
    "BuildProgress",
    "BuildResult",
    "CacheError",
    "CachedBuild",
    "CancelToken",
    "Candidate",
    "DownloadError",
    "LlamactlError",
    "PlanError",
    "ResolvedServer",
    "SourceError",
    "SourceTree",
    "ToolchainError",
    "VerificationError",
    "build",
    "build_default",
    "candidates",
    "make_plan",
    "provision",
    "resolve_server",
    "resolve_worker",
]


def build_default(
    *,
    home: Path | None = None,
    on_progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> BuildResult:
    """Build (or reuse) the default plan for this machine: what ``llamactl build`` does."""
    from buildtools.builder import build
    from buildtools.demo import demo_model_path
    from buildtools.hardware import detect
    from buildtools.plan import BuildOptions
    from buildtools.source import provision

    profile = detect()
    source = provision(home=home)
    return build(
        profile,
        BuildOptions(),
        source,
        model=demo_model_path(home),
        home=home,
        on_progress=on_progress,
        cancel=cancel,
    )
