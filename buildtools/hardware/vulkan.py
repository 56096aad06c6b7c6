"""Vulkan: any GPU with a Vulkan driver (AMD, Intel, NVIDIA, Apple via MoltenVK).

Building needs more than running: CMake's ``find_package(Vulkan)`` wants the
loader *and* the headers, and ggml compiles its compute shaders to SPIR-V
with ``glslc`` (shaderc) at build time, which distributions package apart
from the loader; a missing ``glslc`` is the usual reason a Vulkan build fails
after configure. A loader without a GPU driver, or with only lavapipe
(Mesa's software rasteriser on the CPU), would build a binary that runs
slower than the CPU backend, so a real GPU device (or at least a GPU
driver's ICD manifest when ``vulkaninfo`` is absent) is required.
"""

from __future__ import annotations

from pathlib import Path

from buildtools.hardware._model import Backend, BackendStatus, GpuInfo
from buildtools.hardware._probe import (
    BackendReport,
    ProbeContext,
    find_header,
    find_shared_library,
    missing_build_tools,
)

__all__ = ["VulkanBackend", "parse_vulkaninfo_summary"]

_LOADER_NAMES = (
    "libvulkan.so.1",
    "libvulkan.so",
    "libvulkan.1.dylib",
    "libvulkan.dylib",
    "vulkan-1.dll",
)
_ICD_DIRS = (
    "usr/share/vulkan/icd.d",
    "etc/vulkan/icd.d",
    "usr/local/share/vulkan/icd.d",
    "opt/homebrew/share/vulkan/icd.d",
)
#: PCI vendor ids as vulkaninfo prints them
_VENDORS = {
    "0x10de": "nvidia",
    "0x1002": "amd",
    "0x8086": "intel",
    "0x106b": "apple",
    "0x13b5": "arm",
    "0x5143": "qualcomm",
}
#: manifests of software (CPU) implementations: a build against them gains nothing
_SOFTWARE_ICDS = ("lvp_icd", "swiftshader")


def parse_vulkaninfo_summary(text: str) -> tuple[GpuInfo, ...]:
    """The non-CPU devices in ``vulkaninfo --summary`` output."""
    devices: list[dict[str, str]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("GPU") and stripped.endswith(":") and stripped[3:-1].isdigit():
            devices.append({})
        elif devices and "=" in stripped:
            key, _, value = stripped.partition("=")
            devices[-1][key.strip()] = value.strip()
    return tuple(
        GpuInfo(
            vendor=_VENDORS.get(d.get("vendorID", "").lower(), "unknown"),
            name=d.get("deviceName", "unknown"),
            index=index,
            driver_version=d.get("driverInfo") or d.get("driverVersion"),
        )
        for index, d in enumerate(devices)
        if d.get("deviceType") != "PHYSICAL_DEVICE_TYPE_CPU"
    )


def _gpu_icds(ctx: ProbeContext) -> list[str]:
    names = []
    for directory in _ICD_DIRS:
        for manifest in sorted(ctx.under_root(directory).glob("*.json")):
            if not manifest.name.startswith(_SOFTWARE_ICDS):
                names.append(manifest.name)
    return names


def _find_gpus(ctx: ProbeContext) -> tuple[str, tuple[GpuInfo, ...]] | str:
    """What shows a Vulkan GPU is here (description, devices), or why none is."""
    if find_shared_library(ctx, _LOADER_NAMES) is None:
        return (
            "Vulkan loader (libvulkan.so.1) not found: install libvulkan1 and your GPU's "
            "Vulkan driver"
        )
    listing = ctx.runner(["vulkaninfo", "--summary"], timeout=20)
    gpus = parse_vulkaninfo_summary(listing.stdout) if listing.ok else ()
    if gpus:
        return ", ".join(g.name for g in gpus), gpus
    if listing.ok:
        return "vulkaninfo lists no GPU (only CPU/software devices, if any)"
    if icds := _gpu_icds(ctx):
        return f"driver(s) {', '.join(icds)} (devices not listed: vulkaninfo failed)", ()
    return (
        "no Vulkan GPU driver found (no ICD manifest in /usr/share/vulkan/icd.d, and "
        "vulkaninfo is not available to list devices: install vulkan-tools)"
    )


def _build_blocker(ctx: ProbeContext, found: str) -> str | None:
    """Why a Vulkan build would fail at configure or compile time, or ``None``."""
    if not ctx.tool("glslc").found:
        return (
            f"Vulkan {found} found but glslc (shaderc) is missing: ggml compiles its "
            "shaders with it at build time; install glslc or the Vulkan SDK"
        )
    sdk = [Path(ctx.env["VULKAN_SDK"]) / "include"] if ctx.env.get("VULKAN_SDK") else []
    if ctx.platform.system != "windows" and find_header(ctx, "vulkan/vulkan.h", sdk) is None:
        return (
            f"Vulkan {found} found but the Vulkan headers are missing: install libvulkan-dev "
            "or the Vulkan SDK"
        )
    return missing_build_tools(ctx)


class VulkanBackend:
    """Vulkan: loader, headers, glslc and a GPU driver."""

    backend = Backend.VULKAN

    def probe(self, ctx: ProbeContext) -> BackendReport:
        try:
            seen = _find_gpus(ctx)
        except OSError as exc:
            seen = f"could not inspect the Vulkan installation: {exc}"
        if isinstance(seen, str):
            return _report(False, seen)
        found, gpus = seen
        if blocker := _build_blocker(ctx, found):
            return _report(False, blocker, gpus)
        return _report(True, f"{found}; glslc {ctx.tool('glslc').version or '?'}", gpus)


def _report(available: bool, reason: str, gpus: tuple[GpuInfo, ...] = ()) -> BackendReport:
    status = BackendStatus(backend=Backend.VULKAN, available=available, reason=reason)
    return BackendReport(status=status, gpus=gpus)
