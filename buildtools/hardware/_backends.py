"""The backend registry: one probe per :class:`Backend`, in the order GPUs are merged."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from buildtools.hardware._model import Backend, GpuInfo
from buildtools.hardware._probe import BackendProbe, BackendReport
from buildtools.hardware.cpu import CpuBackend
from buildtools.hardware.cuda import CudaBackend
from buildtools.hardware.metal import MetalBackend
from buildtools.hardware.opencl import OpenclBackend
from buildtools.hardware.vulkan import VulkanBackend

__all__ = ["BACKENDS", "merge_gpus"]

_PROBES: tuple[BackendProbe, ...] = (
    CpuBackend(),
    CudaBackend(),
    MetalBackend(),
    VulkanBackend(),
    OpenclBackend(),
)
BACKENDS: Mapping[Backend, BackendProbe] = MappingProxyType({p.backend: p for p in _PROBES})


def merge_gpus(reports: Mapping[Backend, BackendReport]) -> tuple[GpuInfo, ...]:
    """One entry per physical GPU, from the API that knows it best.

    The same card shows up in NVML, Vulkan and OpenCL under different
    indices, so devices are taken per vendor from the first backend in
    registry order that reports that vendor: NVML (memory, compute
    capability) before Vulkan before OpenCL.
    """
    merged: list[GpuInfo] = []
    seen_vendors: set[str] = set()
    for backend in BACKENDS:
        report = reports.get(backend)
        if report is None:
            continue
        fresh = [g for g in report.gpus if g.vendor not in seen_vendors or g.vendor == "unknown"]
        merged.extend(fresh)
        seen_vendors.update(g.vendor for g in report.gpus)
    return tuple(merged)
