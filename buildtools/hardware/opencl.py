"""OpenCL: Qualcomm Adreno and Intel GPUs only.

ggml's OpenCL backend is not a generic OpenCL backend: at start-up it
accepts a device only if its name says Adreno or Intel and otherwise logs
"Unsupported GPU" and gives up (``ggml-opencl.cpp``, ``GPU_FAMILY``), and
llama.cpp's README lists its target as "Adreno GPU". An NVIDIA or AMD OpenCL
driver therefore does not make this backend available. Building needs the
ICD loader (``libOpenCL``) and the ``CL/cl.h`` headers; a vendor driver is
registered as an ``.icd`` file in ``/etc/OpenCL/vendors``. Device names come
from ``clinfo -l`` when it is installed; otherwise the ICD file names are the
only evidence.
"""

from __future__ import annotations

import re

from buildtools.hardware._model import Backend, BackendStatus, GpuInfo
from buildtools.hardware._probe import (
    BackendReport,
    ProbeContext,
    find_header,
    find_shared_library,
    missing_build_tools,
)

__all__ = ["OpenclBackend", "ggml_supports", "parse_clinfo_list"]

_LOADER_NAMES = ("libOpenCL.so.1", "libOpenCL.so", "OpenCL.dll")
_DEVICE_LINE = re.compile(r"^\s*`--\s*Device #(\d+):\s*(.+?)\s*$")
#: ICD files naming a driver for a GPU family ggml-opencl accepts
_SUPPORTED_ICD = re.compile(r"intel|adreno|qcom", re.IGNORECASE)


def parse_clinfo_list(text: str) -> tuple[GpuInfo, ...]:
    """Devices in ``clinfo -l`` output (``Platform #0: ...`` / `` `-- Device #0: ...``)."""
    devices: list[GpuInfo] = []
    for line in text.splitlines():
        if match := _DEVICE_LINE.match(line):
            name = match.group(2)
            devices.append(GpuInfo(vendor=_vendor(name), name=name, index=len(devices)))
    return tuple(devices)


def _vendor(name: str) -> str:
    lowered = name.lower()
    for needle, vendor in (("adreno", "qualcomm"), ("intel", "intel"), ("nvidia", "nvidia")):
        if needle in lowered:
            return vendor
    if "radeon" in lowered or lowered.startswith("gfx"):
        return "amd"
    return "unknown"


def ggml_supports(device_name: str) -> bool:
    """Whether ggml-opencl would accept this device: an Adreno or an Intel *GPU*.

    Intel's CPU runtime also names its devices "Intel(R) Core(TM)...", and
    ggml asks for GPU devices only, so an Intel name must also say it is a GPU.
    """
    if "Adreno" in device_name:
        return True
    return "Intel" in device_name and any(w in device_name for w in ("Graphics", "Arc", "GPU"))


def _find_gpus(ctx: ProbeContext) -> tuple[str, tuple[GpuInfo, ...]] | str:
    """What shows an Adreno/Intel OpenCL GPU is here (description, devices), or why none is."""
    if find_shared_library(ctx, _LOADER_NAMES) is None:
        return "OpenCL ICD loader (libOpenCL.so.1) not found: install ocl-icd-libopencl1"
    listing = ctx.runner(["clinfo", "-l"], timeout=20)
    if listing.ok:
        devices = parse_clinfo_list(listing.stdout)
        # only devices ggml would use are reported: clinfo also lists CPU runtimes
        if supported := tuple(d for d in devices if ggml_supports(d.name)):
            return ", ".join(d.name for d in supported), supported
        seen = ", ".join(d.name for d in devices) or "no device"
        return f"clinfo lists {seen}; ggml's OpenCL backend only runs on Adreno and Intel GPUs"
    icds = sorted(p.name for p in ctx.under_root("etc/OpenCL/vendors").glob("*.icd"))
    if not icds:
        return "no OpenCL driver registered (no .icd file in /etc/OpenCL/vendors)"
    if not any(_SUPPORTED_ICD.search(name) for name in icds):
        return (
            f"OpenCL driver(s) {', '.join(icds)} found, but ggml's OpenCL backend only "
            "runs on Adreno and Intel GPUs (install clinfo to list devices)"
        )
    return f"driver(s) {', '.join(icds)} (devices not listed: clinfo not installed)", ()


def _build_blocker(ctx: ProbeContext, found: str) -> str | None:
    """Why an OpenCL build would fail at configure time, or ``None``."""
    if ctx.platform.system != "windows" and find_header(ctx, "CL/cl.h") is None:
        return (
            f"OpenCL {found} found but the headers (CL/cl.h) are missing: "
            "install opencl-headers (or ocl-icd-opencl-dev)"
        )
    return missing_build_tools(ctx)


class OpenclBackend:
    """OpenCL: loader, headers and an Adreno or Intel GPU driver."""

    backend = Backend.OPENCL

    def probe(self, ctx: ProbeContext) -> BackendReport:
        if ctx.platform.system == "darwin":
            return _report(False, "ggml's OpenCL backend targets Adreno and Intel GPUs; use Metal")
        try:
            seen = _find_gpus(ctx)
        except OSError as exc:
            seen = f"could not inspect the OpenCL installation: {exc}"
        if isinstance(seen, str):
            return _report(False, seen)
        found, gpus = seen
        if blocker := _build_blocker(ctx, found):
            return _report(False, blocker, gpus)
        return _report(True, f"OpenCL {found}", gpus)


def _report(available: bool, reason: str, gpus: tuple[GpuInfo, ...] = ()) -> BackendReport:
    status = BackendStatus(backend=Backend.OPENCL, available=available, reason=reason)
    return BackendReport(status=status, gpus=gpus)
