"""Build llama.cpp's server for this machine: detect, plan, compile, verify, cache.

The flow, each step a value you can print and test::

    detect() -> HardwareProfile --make_plan(options)--> BuildPlan
    provision() -> SourceTree
    build(profile, options, source) -> BuildResult (a verified CachedBuild)
    resolve_server() -> ResolvedServer (what `llamactl serve` runs)
"""

from __future__ import annotations

from pathlib import Path

from buildtools.builder import BuildProgress, BuildResult, ProgressCallback, build
from buildtools.cache import BuildCache, CachedBuild
from buildtools.errors import (
    BuildError,
    CacheError,
    DownloadError,
    LlamactlError,
    PlanError,
    SourceError,
    ToolchainError,
    VerificationError,
)
from buildtools.locate import Candidate, ResolvedServer, candidates, resolve_server
from buildtools.plan import BuildOptions, BuildPlan, make_plan
from buildtools.source import SourceTree, provision

__all__ = [
    "BuildCache",
    "BuildError",
    "BuildOptions",
    "BuildPlan",
    "BuildProgress",
    "BuildResult",
    "CacheError",
    "CachedBuild",
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
]


def build_default(
    *, home: Path | None = None, on_progress: ProgressCallback | None = None
) -> BuildResult:
    """Build (or reuse) the default plan for this machine: what ``llamactl build`` does."""
    from buildtools.demo import demo_model_path
    from buildtools.hardware import detect

    profile = detect()
    source = provision(home=home)
    return build(
        profile,
        BuildOptions(),
        source,
        model=demo_model_path(home),
        home=home,
        on_progress=on_progress,
    )
