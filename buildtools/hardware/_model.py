"""Frozen value objects that describe a machine.

Probes return these; the build plan is a pure function of them. Anything a
probe could not learn is ``None`` or an empty tuple plus a reason, never an
exception.
"""

from __future__ import annotations

import enum
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "Backend",
    "BackendStatus",
    "CpuInfo",
    "GpuInfo",
    "HardwareProfile",
    "PlatformInfo",
    "Tool",
]

#: ``platform.machine()`` spellings of the two architecture families ggml builds for
X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
ARM_MACHINES = frozenset({"arm64", "aarch64", "armv7l", "armv8l"})


class Backend(enum.StrEnum):
    """A ggml compute backend llamactl knows how to build."""

    CPU = "cpu"
    CUDA = "cuda"
    METAL = "metal"
    OPENCL = "opencl"
    VULKAN = "vulkan"


@dataclass(frozen=True, kw_only=True)
class PlatformInfo:
    """The operating system and architecture the probes should assume.

    Probes take it as an argument rather than asking :mod:`platform` so that a
    test on Linux can describe a Mac.
    """

    system: str
    """``platform.system()`` lower-cased: ``linux``, ``darwin``, ``windows``..."""
    machine: str
    """``platform.machine()`` lower-cased: ``x86_64``, ``arm64``, ``aarch64``..."""

    @classmethod
    def current(cls) -> PlatformInfo:
        return cls(system=platform.system().lower(), machine=platform.machine().lower())

    @property
    def is_x86(self) -> bool:
        return self.machine in X86_MACHINES

    @property
    def is_arm(self) -> bool:
        return self.machine in ARM_MACHINES


@dataclass(frozen=True, kw_only=True)
class CpuInfo:
    """The CPU as a build may use it.

    ``features`` holds the lower-case instruction-set names (``avx2``,
    ``avx512f``, ``amx_int8``...) that both the CPU advertises and the OS lets
    this process use. ``advertised_only`` maps the ones the CPU reports but
    that may not be used here to the reason.
    """

    arch: str
    """``platform.machine()`` lower-cased: x86_64, arm64, aarch64..."""
    model: str = "unknown"
    """Marketing name of the CPU, or ``unknown``."""
    vendor: str = "unknown"
    """CPU vendor string (GenuineIntel, AuthenticAMD, Apple...), or ``unknown``."""
    cores: int | None = None
    """Logical CPUs this process may run on."""
    features: tuple[str, ...] = ()
    """Instruction-set extensions a build may use here, sorted."""
    advertised_only: dict[str, str] = field(default_factory=dict)
    """Extensions the CPU reports but this OS or process cannot use, with the reason."""
    notes: tuple[str, ...] = ()
    """Anything the probe could not establish, in words."""

    def has(self, feature: str) -> bool:
        return feature in self.features


@dataclass(frozen=True, kw_only=True)
class GpuInfo:
    """One GPU as its driver reports it."""

    vendor: str
    """``nvidia``, ``apple``, ``amd``, ``intel`` or ``unknown``."""
    name: str
    index: int = 0
    memory_bytes: int | None = None
    """Total device memory."""
    memory_free_bytes: int | None = None
    """Free device memory when probed."""
    compute_capability: str | None = None
    """CUDA compute capability as ``"9.0"``; ``None`` for non-NVIDIA GPUs."""
    driver_version: str | None = None
    uuid: str | None = None


@dataclass(frozen=True, kw_only=True)
class Tool:
    """An executable found on this machine (or the reason it was not)."""

    name: str
    path: str | None = None
    version: str | None = None
    reason: str = ""
    """Why it is missing or its version is unknown; empty when found."""

    @property
    def found(self) -> bool:
        return self.path is not None


@dataclass(frozen=True, kw_only=True)
class BackendStatus:
    """Whether a backend can be built *and* used on this machine."""

    backend: Backend
    available: bool
    reason: str
    """Why it is (or is not) available, with the evidence."""


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    """Everything the build plan needs to know about the machine."""

    os: str
    """``linux``, ``darwin``, ``windows``..."""
    cpu: CpuInfo
    gpus: tuple[GpuInfo, ...] = ()
    toolchains: dict[str, Tool] = field(default_factory=dict)
    """Keyed by tool name: cmake, ninja, cc, cxx, nvcc, ccache, glslc."""
    backends: dict[Backend, BackendStatus] = field(default_factory=dict)

    def backend_available(self, backend: Backend) -> bool:
        status = self.backends.get(backend)
        return status is not None and status.available

    def tool(self, name: str) -> Tool:
        return self.toolchains.get(name) or Tool(name=name, reason="not probed")

    def to_json(self) -> dict[str, Any]:
        """The ``llamactl detect --json`` document."""
        return {
            "os": self.os,
            "cpu": asdict(self.cpu),
            "gpus": [asdict(g) for g in self.gpus],
            "toolchains": {name: asdict(t) for name, t in sorted(self.toolchains.items())},
            "backends": {
                str(b): {"available": s.available, "reason": s.reason}
                for b, s in sorted(self.backends.items())
            },
        }
