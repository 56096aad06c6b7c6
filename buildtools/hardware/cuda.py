"""NVIDIA GPUs (from NVML) and whether a CUDA build could use them.

A CUDA build needs two independent things, and peers' most common complaint
("the GPU is silently unused") comes from having only one: the driver with a
GPU (NVML answers), and the toolkit to compile with (nvcc). Two more ways a
build compiles and then fails at run time are checked with evidence: a
toolkit of a newer major version than the driver supports ("CUDA driver
version is insufficient for CUDA runtime version"), and a GPU older than the
toolkit can target (CUDA 12 dropped compute capability < 5.0, CUDA 13 < 7.5).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from buildtools._nvidia import NO_DRIVER, nvidia_driver_loaded
from buildtools.hardware._model import Backend, BackendStatus, GpuInfo, Tool
from buildtools.hardware._probe import BackendReport, ProbeContext, missing_build_tools

__all__ = ["CudaBackend", "NvidiaGpus", "cuda_status", "probe_nvidia_gpus"]

#: oldest compute capability each nvcc major version can still compile for
_MIN_CAPABILITY = {11: (3, 5), 12: (5, 0), 13: (7, 5)}


@dataclass(frozen=True, kw_only=True)
class NvidiaGpus:
    """What NVML reported: the GPUs, or why there are none."""

    gpus: tuple[GpuInfo, ...] = ()
    reason: str = ""
    """Why no GPU is listed (driver missing, NVML error); empty when some are."""
    cuda_driver_version: str | None = None
    """Newest CUDA runtime the driver supports, as ``"12.4"``."""


def _text(value: Any) -> str:
    """NVML returned bytes before nvidia-ml-py 11.515 and str since."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _nvml_error(exc: Exception) -> str:
    if type(exc).__name__ == "NVMLError_LibraryNotFound":
        return "NVML library not found: no NVIDIA driver"
    if type(exc).__name__ == "NVMLError_DriverNotLoaded":
        return "NVIDIA driver not loaded (NVML: driver not loaded)"
    return f"NVML failed: {exc}"


def _load_nvml() -> Any:
    import pynvml

    return pynvml


def probe_nvidia_gpus(nvml: Any = None) -> NvidiaGpus:
    """Every NVIDIA GPU NVML can see, with total and free memory; never raises.

    ``nvml`` is the ``pynvml`` module or a fake with the same functions.
    """
    if nvml is None and not nvidia_driver_loaded():
        return NvidiaGpus(reason=NO_DRIVER)
    try:
        nvml = _load_nvml() if nvml is None else nvml
    except ImportError:
        return NvidiaGpus(reason="nvidia-ml-py (pynvml) is not installed")
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError and ctypes' OSError alike
        return NvidiaGpus(reason=_nvml_error(exc))
    try:
        return _list_gpus(nvml)
    except Exception as exc:  # a half-working driver must not crash detect
        return NvidiaGpus(reason=_nvml_error(exc))
    finally:
        with contextlib.suppress(Exception):  # nothing useful to do if shutdown fails
            nvml.nvmlShutdown()


def _list_gpus(nvml: Any) -> NvidiaGpus:
    driver = _text(nvml.nvmlSystemGetDriverVersion())
    try:
        cuda_int = int(nvml.nvmlSystemGetCudaDriverVersion())  # e.g. 12040
    except Exception:  # only refines the verdict; old drivers lack it
        cuda_int = 0
    cuda_driver = f"{cuda_int // 1000}.{cuda_int % 1000 // 10}" if cuda_int else None
    gpus = []
    for index in range(int(nvml.nvmlDeviceGetCount())):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        gpus.append(
            GpuInfo(
                vendor="nvidia",
                name=_text(nvml.nvmlDeviceGetName(handle)),
                index=index,
                memory_bytes=int(memory.total),
                memory_free_bytes=int(memory.free),
                compute_capability=f"{major}.{minor}",
                driver_version=driver,
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            )
        )
    reason = "" if gpus else f"NVIDIA driver {driver} is loaded but reports no GPU"
    return NvidiaGpus(gpus=tuple(gpus), reason=reason, cuda_driver_version=cuda_driver)


def _major_minor(version: str | None) -> tuple[int, int] | None:
    try:
        major, minor = (version or "").split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def cuda_status(gpus: NvidiaGpus, nvcc: Tool) -> BackendStatus:
    """Available only with a GPU the driver sees *and* an nvcc that can target it."""

    def status(available: bool, reason: str) -> BackendStatus:
        return BackendStatus(backend=Backend.CUDA, available=available, reason=reason)

    if not gpus.gpus:
        why = gpus.reason or "no NVIDIA GPU found"
        if nvcc.found:
            return status(False, f"nvcc {nvcc.version or '?'} found ({nvcc.path}) but {why}")
        return status(False, why)
    names = ", ".join(sorted({g.name for g in gpus.gpus}))
    if not nvcc.found:
        return status(
            False,
            f"NVIDIA GPU found ({names}) but no CUDA toolkit (nvcc) to build with: "
            "install the CUDA toolkit",
        )
    toolkit = _major_minor(nvcc.version)
    driver = _major_minor(gpus.cuda_driver_version)
    if toolkit and driver and toolkit[0] > driver[0]:
        return status(
            False,
            f"nvcc {nvcc.version} builds for CUDA {toolkit[0]} but driver "
            f"{gpus.gpus[0].driver_version} supports CUDA {gpus.cuda_driver_version} at most: "
            "update the NVIDIA driver or install an older CUDA toolkit",
        )
    if toolkit and (floor := _MIN_CAPABILITY.get(toolkit[0])):
        too_old = [g for g in gpus.gpus if (_major_minor(g.compute_capability) or floor) < floor]
        too_old_text = ", ".join(f"{g.name} ({g.compute_capability})" for g in too_old)
        need = f"CUDA {toolkit[0]} needs compute capability {floor[0]}.{floor[1]}+"
        if len(too_old) == len(gpus.gpus):
            return status(
                False,
                f"nvcc {nvcc.version} cannot target {too_old_text}; {need}: "
                "install an older CUDA toolkit",
            )
    else:
        too_old_text, need = "", ""
    caps = ", ".join(sorted({g.compute_capability or "?" for g in gpus.gpus}))
    driver_version = gpus.gpus[0].driver_version
    reason = f"{names} (compute {caps}, driver {driver_version}) and nvcc {nvcc.version}"
    if toolkit and driver and toolkit > driver:
        reason += (
            f"; nvcc is newer than the driver's CUDA {gpus.cuda_driver_version}, "
            "which CUDA minor-version compatibility allows"
        )
    if too_old_text:
        reason += f"; {too_old_text} will be unused ({need})"
    return status(True, reason)


class CudaBackend:
    """CUDA: an NVIDIA GPU through NVML plus nvcc."""

    backend = Backend.CUDA

    def probe(self, ctx: ProbeContext) -> BackendReport:
        found = probe_nvidia_gpus(ctx.nvml)
        status = cuda_status(found, ctx.tool("nvcc"))
        if status.available and (missing := missing_build_tools(ctx)):
            status = BackendStatus(backend=self.backend, available=False, reason=missing)
        return BackendReport(status=status, gpus=found.gpus)
