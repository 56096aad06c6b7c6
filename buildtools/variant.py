"""What a wheel carries, in the names pip and a package index understand.

One release of llamactl-server exists in several variants: a server built
for exactly this CPU, a portable CPU build, a CUDA build. Three names say
which one a wheel is, all computed here from the plan (a dry run) or from
the manifest a built wheel carries, never from the machine a wheel is read on:

* the **local version label** (PEP 440), as PyTorch does: ``0.1.0+cpu``,
  ``+cpu.portable``, ``+cu130.portable``;
* the **sub-index** of a wheelhouse, as llama-cpp-python publishes one index
  per backend (``/cpu``, ``/cu130``): a user picks the variant with
  ``--extra-index-url``. A build made for one CPU has no sub-index: it is not
  for sharing;
* the **platform tag**: ``linux_x86_64`` as ``pip wheel`` writes it, which no
  public index accepts, then the ``manylinux_2_XX_<arch>`` tag that
  ``auditwheel repair`` gives it. Before the build the glibc of this machine is
  only the ceiling of that tag: auditwheel picks the oldest glibc whose symbol
  versions the binaries need.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from buildtools.hardware._model import HardwareProfile
    from buildtools.plan import BuildPlan

__all__ = [
    "DIST_NAME",
    "WHEEL_PREFIX",
    "WheelVariant",
    "cuda_tag",
    "glibc_version",
    "index_name",
    "plan_variant",
    "platform_tag",
    "variant_from_manifest",
    "variant_label",
    "wheel_variant",
]

#: the distribution name on the package index ("llamactl" there is another project)
DIST_NAME = "llamactl-server"
#: the distribution name as wheel and sdist file names spell it (PEP 427, PEP 625)
WHEEL_PREFIX = "llamactl_server"

_NVCC = re.compile(r"nvcc@(\d+)\.(\d+)")
_MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}


def cuda_tag(version: str | None) -> str:
    """``13.0`` → ``cu130``, as PyTorch and llama-cpp-python name CUDA builds."""
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return f"cu{m.group(1)}{m.group(2)}" if m else "cuda"


def variant_label(backend: str, *, portable: bool, cuda_version: str | None = None) -> str:
    """The local version label: ``cpu``, ``cpu.portable``, ``cu130.portable``, ``metal``..."""
    base = cuda_tag(cuda_version) if backend == "cuda" else backend
    return f"{base}.portable" if portable else base


def index_name(label: str) -> str | None:
    """The wheelhouse sub-index of a label, or ``None`` for a build made for one CPU.

    A portable build is what a sub-index serves: ``cpu.portable`` → ``cpu``,
    ``cu130.portable`` → ``cu130``. A plain ``cpu`` or ``cu130`` wheel needs the
    instruction sets of the machine that built it (the plan's ``cpu_features``),
    so it would die with "Illegal instruction" on an older CPU.
    """
    base, _, rest = label.partition(".")
    return base if rest == "portable" else None


def platform_tag(system: str, machine: str) -> str:
    """The tag ``pip wheel`` gives a platform wheel built here."""
    machine = machine.lower()
    match system.lower():
        case "linux":
            return f"linux_{_MACHINES.get(machine, machine)}"
        case "darwin":
            return f"macosx_11_0_{'arm64' if machine in {'arm64', 'aarch64'} else machine}"
        case "windows":
            return "win_arm64" if machine in {"arm64", "aarch64"} else "win_amd64"
        case other:
            return f"{other}_{machine}"


def glibc_version(confstr: str | None = None) -> tuple[int, int] | None:
    """This machine's glibc (``os.confstr``), or ``None`` on musl, macOS, Windows."""
    if confstr is None:
        try:
            confstr = os.confstr("CS_GNU_LIBC_VERSION")
        except (AttributeError, ValueError, OSError):
            return None
    m = re.fullmatch(r"glibc (\d+)\.(\d+).*", confstr or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True, kw_only=True)
class WheelVariant:
    """The names of one wheel variant (see the module docstring)."""

    label: str
    """PEP 440 local version label: ``cpu``, ``cpu.portable``, ``cu130.portable``."""
    index: str | None
    """Wheelhouse sub-index (``cpu``, ``cu130``); ``None``: built for one CPU, not shared."""
    platform_tag: str
    """What ``pip wheel`` writes: ``linux_x86_64``."""
    manylinux_tag: str | None
    """At most this after ``auditwheel repair`` (Linux with glibc only)."""

    def wheel_name(self, version: str, *, repaired: bool = False) -> str:
        tag = self.manylinux_tag if repaired and self.manylinux_tag else self.platform_tag
        base = version.split("+", 1)[0]
        return f"{WHEEL_PREFIX}-{base}+{self.label}-py3-none-{tag}.whl"

    def to_json(self, version: str) -> dict[str, Any]:
        return {
            "label": self.label,
            "index": self.index,
            "platform_tag": self.platform_tag,
            "manylinux_tag": self.manylinux_tag,
            "wheel": self.wheel_name(version),
            "repaired_wheel": self.wheel_name(version, repaired=True)
            if self.manylinux_tag
            else None,
        }


def wheel_variant(
    *,
    backend: str,
    portable: bool,
    cuda_version: str | None,
    system: str,
    machine: str,
    glibc: tuple[int, int] | None,
) -> WheelVariant:
    """The variant of a wheel built for this plan on this kind of machine (pure)."""
    label = variant_label(backend, portable=portable, cuda_version=cuda_version)
    tag = platform_tag(system, machine)
    manylinux = None
    if tag.startswith("linux_") and glibc is not None:
        manylinux = f"manylinux_{glibc[0]}_{glibc[1]}_{tag.removeprefix('linux_')}"
    return WheelVariant(
        label=label, index=index_name(label), platform_tag=tag, manylinux_tag=manylinux
    )


def variant_from_manifest(manifest: Mapping[str, Any]) -> str:
    """The label of the build a manifest describes (the wheel's ``llamactl-build.json``)."""
    plan = manifest.get("plan", {})
    backend = str(plan.get("backend", "cpu"))
    nvcc = _NVCC.search(str(manifest.get("compiler", "")))
    cuda = f"{nvcc.group(1)}.{nvcc.group(2)}" if nvcc else None
    portable = plan.get("cmake_defines", {}).get("GGML_BACKEND_DL") == "ON"
    return variant_label(backend, portable=portable, cuda_version=cuda)


def plan_variant(
    plan: BuildPlan, profile: HardwareProfile, *, glibc: tuple[int, int] | None
) -> WheelVariant:
    """The variant a wheel of ``plan`` would be: what ``build --wheel --dry-run`` shows."""
    cuda = plan.cmake_defines.get("GGML_CUDA") == "ON"
    return wheel_variant(
        backend=str(plan.backend),
        portable=plan.cmake_defines.get("GGML_BACKEND_DL") == "ON",
        cuda_version=profile.tool("nvcc").version if cuda else None,
        system=profile.os,
        machine=profile.cpu.arch,
        glibc=glibc,
    )
