"""What this machine can build and run: CPU features, GPUs, toolchains, backends.

:func:`detect` runs every probe and returns a frozen :class:`HardwareProfile`;
the build plan is a pure function of it. Probes take their world as
arguments (environment, runner, filesystem root, NVML module, platform) so
that tests describe fake machines instead of needing them, and a probe that
fails says why in a reason instead of raising.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from buildtools._runner import Runner, capture
from buildtools.hardware._model import (
    Backend,
    BackendStatus,
    CpuInfo,
    GpuInfo,
    HardwareProfile,
    PlatformInfo,
    Tool,
)
from buildtools.hardware.cpu import probe_cpu

__all__ = [
    "Backend",
    "BackendStatus",
    "CpuInfo",
    "GpuInfo",
    "HardwareProfile",
    "PlatformInfo",
    "Tool",
    "detect",
    "detect_cpu",
]


def detect_cpu(
    *,
    runner: Runner = capture,
    proc_root: Path = Path("/"),
    platform_info: PlatformInfo | None = None,
) -> CpuInfo:
    """Only the CPU: enough to tell whether a cached build's instructions run here."""
    return probe_cpu(runner=runner, proc_root=proc_root, platform_info=platform_info)


def detect(
    *,
    env: Mapping[str, str] | None = None,
    runner: Runner = capture,
    proc_root: Path = Path("/"),
    nvml: object | None = None,
    platform_info: PlatformInfo | None = None,
) -> HardwareProfile:
    """Probe the machine; never raises for anything the machine lacks.

    ``proc_root`` is the filesystem root the probes read (``/proc/cpuinfo``,
    ``/etc/OpenCL/vendors``, ``/usr/include``...); ``nvml`` stands in for the
    ``pynvml`` module. Takes about 0.1 s plus the ``--version`` runs.
    """
    # the GPU/toolchain probes are imported here: `serve` only needs detect_cpu
    from buildtools.hardware._backends import BACKENDS, merge_gpus
    from buildtools.hardware._probe import ProbeContext
    from buildtools.hardware.toolchains import probe_toolchains

    env = os.environ if env is None else env
    plat = platform_info or PlatformInfo.current()
    cpu = probe_cpu(runner=runner, proc_root=proc_root, platform_info=plat)
    ctx = ProbeContext(
        platform=plat,
        env=env,
        runner=runner,
        root=proc_root,
        cpu=cpu,
        toolchains=probe_toolchains(runner, env, python=sys.executable, root=proc_root),
        nvml=nvml,
    )
    reports = {backend: probe.probe(ctx) for backend, probe in BACKENDS.items()}
    return HardwareProfile(
        os=plat.system,
        cpu=cpu,
        gpus=merge_gpus(reports),
        toolchains=dict(ctx.toolchains),
        backends={backend: reports[backend].status for backend in Backend},
    )
