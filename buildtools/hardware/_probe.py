"""What every backend probe receives, returns and shares.

A backend is a module with one object satisfying :class:`BackendProbe`; the
registry in ``_backends.py`` maps each :class:`Backend` to it. Probes see the
machine only through :class:`ProbeContext` (a runner, an environment, a
filesystem root), so a test can hand them a fake world.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from buildtools._runner import Runner
from buildtools.hardware._model import (
    Backend,
    BackendStatus,
    CpuInfo,
    GpuInfo,
    PlatformInfo,
    Tool,
)

__all__ = [
    "BackendProbe",
    "BackendReport",
    "ProbeContext",
    "find_header",
    "find_shared_library",
    "missing_build_tools",
]

#: where distributions put shared libraries, relative to the filesystem root;
#: searched before asking ldconfig so that a fake root in a test is enough
_LIBRARY_DIRS = (
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib64",
    "usr/lib",
    "lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
    "lib64",
    "usr/local/lib",
    "opt/homebrew/lib",
    "Windows/System32",
)
_INCLUDE_DIRS = ("usr/include", "usr/local/include", "opt/homebrew/include")


@dataclass(frozen=True, kw_only=True)
class ProbeContext:
    """The world a backend probe may look at."""

    platform: PlatformInfo
    env: Mapping[str, str]
    runner: Runner
    root: Path = Path("/")
    """Filesystem root for ``/proc``, ``/etc``, ``/usr``: a tmp tree in tests."""
    cpu: CpuInfo
    toolchains: Mapping[str, Tool] = field(default_factory=dict)
    nvml: object | None = None
    """An NVML module (``pynvml``) or a fake; ``None`` imports the real one."""

    def tool(self, name: str) -> Tool:
        return self.toolchains.get(name) or Tool(name=name, reason="not probed")

    def under_root(self, path: str) -> Path:
        return self.root / path.lstrip("/")


@dataclass(frozen=True, kw_only=True)
class BackendReport:
    """A backend's verdict and the devices it saw on the way."""

    status: BackendStatus
    gpus: tuple[GpuInfo, ...] = ()


class BackendProbe(Protocol):
    """One ggml backend's idea of whether this machine can build and run it."""

    @property
    def backend(self) -> Backend: ...

    def probe(self, ctx: ProbeContext) -> BackendReport:
        """Never raises: a failure is an unavailable status with the reason."""
        ...


def missing_build_tools(ctx: ProbeContext) -> str | None:
    """Why no backend can be built here, or ``None`` when the build tools exist.

    Every ggml backend is compiled by CMake and Ninja (what llamactl's builder
    drives) with the host C and C++ compilers, even CUDA, whose nvcc hands
    host code to them; so one missing tool rules out all of them.
    """
    missing = [name for name in ("cmake", "ninja", "cc", "cxx") if not ctx.tool(name).found]
    if not missing:
        return None
    hint = (
        "install the Xcode command line tools (xcode-select --install)"
        if ctx.platform.system == "darwin"
        else "install a C/C++ toolchain (e.g. apt install build-essential); pip install cmake ninja"
    )
    return f"cannot build anything: {', '.join(missing)} not found; {hint}"


def find_shared_library(ctx: ProbeContext, names: Sequence[str]) -> Path | None:
    """The first of ``names`` (e.g. ``libvulkan.so.1``) present on this machine.

    Looks in the usual directories under ``ctx.root`` and ``$LD_LIBRARY_PATH``
    first, then in the dynamic linker's cache (``ldconfig -p`` through the
    runner) because that is what ``dlopen`` will actually use at run time.
    """
    dirs = [ctx.under_root(d) for d in _LIBRARY_DIRS]
    dirs += [Path(d) for d in ctx.env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    for directory in dirs:
        for name in names:
            candidate = directory / name
            if candidate.exists():
                return candidate
    if ctx.platform.system != "linux":
        return None
    ldconfig = ctx.under_root("sbin/ldconfig")
    result = ctx.runner([str(ldconfig) if ldconfig.exists() else "ldconfig", "-p"], timeout=10)
    if not result.ok:
        return None
    for line in result.stdout.splitlines():
        soname, _, target = line.strip().partition(" => ")
        if target and soname.split(" ", 1)[0] in names:
            return Path(target.strip())
    return None


def find_header(ctx: ProbeContext, relative: str, extra_dirs: Sequence[Path] = ()) -> Path | None:
    """``relative`` (e.g. ``vulkan/vulkan.h``) in the system include directories.

    CMake's ``find_package(Vulkan)``/``find_package(OpenCL)`` fail at configure
    time without the development headers even when the runtime loader is
    installed; checking here turns a confusing CMake error into a reason.
    """
    for directory in [*extra_dirs, *(ctx.under_root(d) for d in _INCLUDE_DIRS)]:
        if (directory / relative).exists():
            return directory / relative
    return None
