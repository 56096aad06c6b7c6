"""GPU backends on fake machines: fake NVML, library/ICD trees, vulkaninfo and clinfo output."""

from __future__ import annotations

from pathlib import Path

import pytest

from buildtools.hardware import Backend, CpuInfo, GpuInfo, PlatformInfo, Tool, detect
from buildtools.hardware._backends import BACKENDS, merge_gpus
from buildtools.hardware._model import BackendStatus
from buildtools.hardware._probe import BackendReport, ProbeContext
from buildtools.hardware.cuda import NvidiaGpus, cuda_status, probe_nvidia_gpus
from buildtools.hardware.metal import MetalBackend
from buildtools.hardware.opencl import OpenclBackend, ggml_supports, parse_clinfo_list
from buildtools.hardware.vulkan import VulkanBackend, parse_vulkaninfo_summary
from tests.unit.hardware_fakes import (
    LINUX_X86,
    MAC_ARM,
    MAC_X86,
    FakeGpu,
    FakeNvml,
    FakeRunner,
    NVMLError,
    NVMLError_LibraryNotFound,
    executable,
    proc_tree,
    touch,
    x86_cpuinfo,
    xsave,
)

NVCC = Tool(name="nvcc", path="/usr/local/cuda/bin/nvcc", version="12.4")
NO_NVCC = Tool(name="nvcc", reason="not found")
BUILD_TOOLS = {
    "cmake": Tool(name="cmake", path="/venv/bin/cmake", version="3.31.6"),
    "ninja": Tool(name="ninja", path="/venv/bin/ninja", version="1.12.1"),
    "cc": Tool(name="cc", path="/usr/bin/cc", version="12.2.0"),
    "cxx": Tool(name="cxx", path="/usr/bin/c++", version="12.2.0"),
    "glslc": Tool(name="glslc", path="/usr/bin/glslc", version="2023.8"),
}


def ctx(
    root: Path,
    runner: FakeRunner | None = None,
    *,
    platform: PlatformInfo = LINUX_X86,
    tools: dict[str, Tool] | None = None,
    model: str = "Fake CPU",
    notes: tuple[str, ...] = (),
) -> ProbeContext:
    return ProbeContext(
        platform=platform,
        env={"PATH": ""},
        runner=runner or FakeRunner(),
        root=root,
        cpu=CpuInfo(arch=platform.machine, model=model, notes=notes),
        toolchains=BUILD_TOOLS if tools is None else tools,
    )


# -- NVML and CUDA ------------------------------------------------------------


def test_nvml_reports_each_gpu() -> None:
    nvml = FakeNvml(
        gpus=[
            FakeGpu(),
            FakeGpu(name=b"NVIDIA L4", total=24 << 30, free=1 << 30, capability=(8, 9)),
        ]
    )
    found = probe_nvidia_gpus(nvml)
    assert found.reason == ""
    assert found.cuda_driver_version == "12.4"
    h100, l4 = found.gpus
    assert h100 == GpuInfo(
        vendor="nvidia",
        name="NVIDIA H100 80GB HBM3",
        index=0,
        memory_bytes=80 << 30,
        memory_free_bytes=79 << 30,
        compute_capability="9.0",
        driver_version="550.54.14",
        uuid="GPU-00000000-1111-2222-3333-444444444444",
    )
    assert (l4.name, l4.index, l4.compute_capability) == ("NVIDIA L4", 1, "8.9")
    assert nvml.shut_down


def test_nvml_library_missing_means_no_driver() -> None:
    found = probe_nvidia_gpus(
        FakeNvml(init_error=NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    )
    assert found.gpus == ()
    assert found.reason == "NVML library not found: no NVIDIA driver"


def test_nvml_failing_mid_query_degrades_to_a_reason() -> None:
    nvml = FakeNvml(query_error=NVMLError("GPU is lost"))
    found = probe_nvidia_gpus(nvml)
    assert found.gpus == ()
    assert "GPU is lost" in found.reason
    assert nvml.shut_down


def test_driver_without_gpus() -> None:
    found = probe_nvidia_gpus(FakeNvml(gpus=[]))
    assert "reports no GPU" in found.reason


def test_gpu_and_nvcc_make_cuda_available() -> None:
    status = cuda_status(probe_nvidia_gpus(FakeNvml()), NVCC)
    assert status.available
    assert "NVIDIA H100 80GB HBM3" in status.reason
    assert "nvcc 12.4" in status.reason


def test_gpu_without_nvcc() -> None:
    status = cuda_status(probe_nvidia_gpus(FakeNvml()), NO_NVCC)
    assert not status.available
    assert status.reason == (
        "NVIDIA GPU found (NVIDIA H100 80GB HBM3) but no CUDA toolkit (nvcc) to build with: "
        "install the CUDA toolkit"
    )


def test_nvcc_without_gpu_says_so() -> None:
    found = NvidiaGpus(reason="NVML library not found: no NVIDIA driver")
    status = cuda_status(found, NVCC)
    assert not status.available
    assert status.reason == (
        "nvcc 12.4 found (/usr/local/cuda/bin/nvcc) but NVML library not found: no NVIDIA driver"
    )


def test_toolkit_newer_than_the_driver_major_is_refused() -> None:
    status = cuda_status(
        probe_nvidia_gpus(FakeNvml(cuda_driver=12040)), Tool(name="nvcc", path="/x", version="13.0")
    )
    assert not status.available
    assert "supports CUDA 12.4 at most" in status.reason


def test_toolkit_newer_minor_is_allowed_with_a_note() -> None:
    status = cuda_status(probe_nvidia_gpus(FakeNvml(cuda_driver=12020)), NVCC)
    assert status.available
    assert "minor-version compatibility" in status.reason


def test_gpu_too_old_for_the_toolkit() -> None:
    pascal = FakeNvml(
        gpus=[FakeGpu(name="NVIDIA GeForce GTX 1080", capability=(6, 1))], cuda_driver=13000
    )
    status = cuda_status(probe_nvidia_gpus(pascal), Tool(name="nvcc", path="/x", version="13.0"))
    assert not status.available
    assert "GTX 1080 (6.1)" in status.reason
    assert "7.5+" in status.reason


# -- Metal ----------------------------------------------------------------------


def test_metal_on_apple_silicon(tmp_path: Path) -> None:
    report = MetalBackend().probe(ctx(tmp_path, platform=MAC_ARM, model="Apple M2 Pro"))
    assert report.status.available
    assert report.gpus == (GpuInfo(vendor="apple", name="Apple M2 Pro GPU"),)


def test_metal_elsewhere(tmp_path: Path) -> None:
    report = MetalBackend().probe(ctx(tmp_path))
    assert not report.status.available
    assert report.status.reason == "Metal needs macOS on Apple silicon; this is linux x86_64"


def test_metal_under_rosetta_says_why(tmp_path: Path) -> None:
    report = MetalBackend().probe(
        ctx(tmp_path, platform=MAC_X86, notes=("this Python runs under Rosetta 2 ...",))
    )
    assert not report.status.available
    assert "Rosetta" in report.status.reason


# -- Vulkan ---------------------------------------------------------------------

VULKANINFO = """==========
VULKANINFO
==========

Devices:
========
GPU0:
\tapiVersion         = 1.3.277
\tdriverVersion      = 24.0.5
\tvendorID           = 0x1002
\tdeviceID           = 0x73bf
\tdeviceType         = PHYSICAL_DEVICE_TYPE_DISCRETE_GPU
\tdeviceName         = AMD Radeon RX 6800 XT (RADV NAVI21)
\tdriverID           = DRIVER_ID_MESA_RADV
\tdriverName         = radv
\tdriverInfo         = Mesa 24.0.5
GPU1:
\tapiVersion         = 1.3.255
\tdriverVersion      = 0.0.1
\tvendorID           = 0x10005
\tdeviceType         = PHYSICAL_DEVICE_TYPE_CPU
\tdeviceName         = llvmpipe (LLVM 15.0.6, 256 bits)
"""


def vulkan_root(root: Path, *, headers: bool = True) -> Path:
    touch(root, "usr/lib/x86_64-linux-gnu/libvulkan.so.1")
    if headers:
        touch(root, "usr/include/vulkan/vulkan.h")
    return root


def test_parse_vulkaninfo_skips_cpu_devices() -> None:
    (gpu,) = parse_vulkaninfo_summary(VULKANINFO)
    assert gpu == GpuInfo(
        vendor="amd",
        name="AMD Radeon RX 6800 XT (RADV NAVI21)",
        index=0,
        driver_version="Mesa 24.0.5",
    )


def test_vulkan_available_with_loader_headers_glslc_and_gpu(tmp_path: Path) -> None:
    report = VulkanBackend().probe(
        ctx(vulkan_root(tmp_path), FakeRunner({"vulkaninfo --summary": VULKANINFO}))
    )
    assert report.status.available, report.status.reason
    assert "RX 6800 XT" in report.status.reason
    assert [g.vendor for g in report.gpus] == ["amd"]


def test_vulkan_with_only_lavapipe_is_refused(tmp_path: Path) -> None:
    only_cpu = VULKANINFO[VULKANINFO.index("GPU1:") :]
    report = VulkanBackend().probe(
        ctx(vulkan_root(tmp_path), FakeRunner({"vulkaninfo --summary": "Devices:\n" + only_cpu}))
    )
    assert not report.status.available
    assert "no GPU" in report.status.reason


def test_vulkan_without_glslc_names_it(tmp_path: Path) -> None:
    tools = {k: v for k, v in BUILD_TOOLS.items() if k != "glslc"}
    report = VulkanBackend().probe(
        ctx(vulkan_root(tmp_path), FakeRunner({"vulkaninfo --summary": VULKANINFO}), tools=tools)
    )
    assert not report.status.available
    assert "glslc" in report.status.reason
    assert report.gpus  # the GPU is still reported


def test_vulkan_without_headers(tmp_path: Path) -> None:
    report = VulkanBackend().probe(
        ctx(vulkan_root(tmp_path, headers=False), FakeRunner({"vulkaninfo --summary": VULKANINFO}))
    )
    assert not report.status.available
    assert "libvulkan-dev" in report.status.reason


def test_vulkan_without_vulkaninfo_trusts_a_gpu_icd(tmp_path: Path) -> None:
    vulkan_root(tmp_path)
    touch(tmp_path, "usr/share/vulkan/icd.d/lvp_icd.x86_64.json")
    assert not VulkanBackend().probe(ctx(tmp_path)).status.available
    touch(tmp_path, "usr/share/vulkan/icd.d/radeon_icd.x86_64.json")
    report = VulkanBackend().probe(ctx(tmp_path))
    assert report.status.available
    assert "radeon_icd.x86_64.json" in report.status.reason


def test_vulkan_loader_missing(tmp_path: Path) -> None:
    runner = FakeRunner()
    report = VulkanBackend().probe(ctx(tmp_path, runner))
    assert not report.status.available
    assert "libvulkan.so.1" in report.status.reason
    assert runner.ran("ldconfig")


def test_vulkan_loader_found_through_ldconfig(tmp_path: Path) -> None:
    ldconfig = "\tlibvulkan.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libvulkan.so.1\n"
    touch(tmp_path, "usr/include/vulkan/vulkan.h")
    runner = FakeRunner({"ldconfig -p": ldconfig, "vulkaninfo --summary": VULKANINFO})
    assert VulkanBackend().probe(ctx(tmp_path, runner)).status.available


# -- OpenCL ---------------------------------------------------------------------

CLINFO_NVIDIA = "Platform #0: NVIDIA CUDA\n `-- Device #0: NVIDIA GeForce RTX 3090\n"
CLINFO_INTEL = (
    "Platform #0: Intel(R) OpenCL Graphics\n `-- Device #0: Intel(R) UHD Graphics 770\n"
    "Platform #1: Intel(R) OpenCL\n `-- Device #0: Intel(R) Core(TM) i7-12700K\n"
)


def opencl_root(root: Path) -> Path:
    touch(root, "usr/lib/x86_64-linux-gnu/libOpenCL.so.1")
    touch(root, "usr/include/CL/cl.h")
    return root


def test_parse_clinfo_and_ggml_support() -> None:
    devices = parse_clinfo_list(CLINFO_INTEL)
    assert [d.name for d in devices] == ["Intel(R) UHD Graphics 770", "Intel(R) Core(TM) i7-12700K"]
    assert [ggml_supports(d.name) for d in devices] == [True, False]
    assert ggml_supports("QUALCOMM Adreno(TM) 750")


def test_opencl_on_an_intel_gpu(tmp_path: Path) -> None:
    report = OpenclBackend().probe(
        ctx(opencl_root(tmp_path), FakeRunner({"clinfo -l": CLINFO_INTEL}))
    )
    assert report.status.available
    assert [g.name for g in report.gpus] == ["Intel(R) UHD Graphics 770"]


def test_opencl_on_nvidia_is_refused_with_ggml_s_reason(tmp_path: Path) -> None:
    report = OpenclBackend().probe(
        ctx(opencl_root(tmp_path), FakeRunner({"clinfo -l": CLINFO_NVIDIA}))
    )
    assert not report.status.available
    assert "only runs on Adreno and Intel GPUs" in report.status.reason


def test_opencl_without_clinfo_uses_icd_files(tmp_path: Path) -> None:
    opencl_root(tmp_path)
    assert "no .icd file" in OpenclBackend().probe(ctx(tmp_path)).status.reason
    touch(tmp_path, "etc/OpenCL/vendors/nvidia.icd", "libnvidia-opencl.so.1")
    assert not OpenclBackend().probe(ctx(tmp_path)).status.available
    touch(tmp_path, "etc/OpenCL/vendors/intel.icd", "libigdrcl.so")
    report = OpenclBackend().probe(ctx(tmp_path))
    assert report.status.available
    assert "intel.icd" in report.status.reason


def test_opencl_loader_missing(tmp_path: Path) -> None:
    report = OpenclBackend().probe(ctx(tmp_path))
    assert "libOpenCL.so.1" in report.status.reason


# -- registry and detect() ------------------------------------------------------


def test_registry_has_every_backend() -> None:
    assert set(BACKENDS) == set(Backend)
    assert all(probe.backend is backend for backend, probe in BACKENDS.items())


def test_missing_compiler_blocks_every_backend(tmp_path: Path) -> None:
    tools = {k: v for k, v in BUILD_TOOLS.items() if k != "cxx"}
    report = BACKENDS[Backend.CPU].probe(ctx(tmp_path, tools=tools))
    assert not report.status.available
    assert "cxx not found" in report.status.reason


def test_merge_gpus_prefers_nvml_per_vendor() -> None:
    nvml_gpu = GpuInfo(vendor="nvidia", name="NVIDIA L4", memory_bytes=24 << 30)
    vk_nvidia = GpuInfo(vendor="nvidia", name="NVIDIA L4")
    vk_amd = GpuInfo(vendor="amd", name="AMD Radeon", index=1)

    def report(backend: Backend, *gpus: GpuInfo) -> BackendReport:
        return BackendReport(
            status=BackendStatus(backend=backend, available=False, reason=""), gpus=gpus
        )

    merged = merge_gpus(
        {
            Backend.CUDA: report(Backend.CUDA, nvml_gpu),
            Backend.VULKAN: report(Backend.VULKAN, vk_nvidia, vk_amd),
        }
    )
    assert merged == (nvml_gpu, vk_amd)


@pytest.mark.parametrize("with_nvcc", [True, False])
def test_detect_on_a_fake_cuda_machine(tmp_path: Path, with_nvcc: bool) -> None:
    bin_dir = tmp_path / "bin"
    for name in ("cmake", "ninja", "cc", "c++", *(["nvcc"] if with_nvcc else [])):
        executable(bin_dir, name)
    runner = FakeRunner(
        {
            "python": xsave(0xE7),
            "cmake --version": "cmake version 3.31.6\n",
            "ninja --version": "1.11.1\n",
            "cc --version": "cc (Debian 12.2.0-14) 12.2.0\n",
            "c++ --version": "c++ (Debian 12.2.0-14) 12.2.0\n",
            "nvcc --version": "Cuda compilation tools, release 12.4, V12.4.131\n",
        }
    )
    root = proc_tree(tmp_path / "root", x86_cpuinfo("sse4_2 avx avx2 fma f16c bmi2"))
    profile = detect(
        env={"PATH": str(bin_dir)},
        runner=runner,
        proc_root=root,
        nvml=FakeNvml(),
        platform_info=LINUX_X86,
    )
    assert set(profile.backends) == set(Backend)
    assert profile.backend_available(Backend.CPU)
    assert profile.backend_available(Backend.CUDA) is with_nvcc
    assert [g.name for g in profile.gpus] == ["NVIDIA H100 80GB HBM3"]
    doc = profile.to_json()
    assert doc["gpus"][0]["compute_capability"] == "9.0"
    assert doc["toolchains"]["cmake"]["version"] == "3.31.6"
    assert set(doc["backends"]) == {"cpu", "cuda", "metal", "opencl", "vulkan"}


def test_without_the_nvidia_kernel_module_nvml_is_not_even_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from buildtools.hardware import cuda

    monkeypatch.setattr(cuda, "nvidia_driver_loaded", lambda: False)
    monkeypatch.setattr(cuda, "_load_nvml", lambda: pytest.fail("pynvml imported"))
    found = cuda.probe_nvidia_gpus()
    assert found.gpus == ()
    assert found.reason == "NVIDIA driver not loaded (no /proc/driver/nvidia)"
    # a given NVML (a fake, or a caller's) is always asked
    assert cuda.probe_nvidia_gpus(FakeNvml(gpus=[])).reason != found.reason


def test_the_driver_check_only_decides_on_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    from buildtools import _nvidia

    monkeypatch.setattr(_nvidia.sys, "platform", "darwin")
    assert _nvidia.nvidia_driver_loaded()
