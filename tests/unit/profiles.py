"""Fake hardware profiles: the machines the build plan must get right."""

from __future__ import annotations

from buildtools.hardware._model import (
    Backend,
    BackendStatus,
    CpuInfo,
    GpuInfo,
    HardwareProfile,
    Tool,
)

X86_BASE = ("sse4_2", "avx", "f16c", "fma", "bmi2", "avx2")
AVX512 = (
    "avx512f",
    "avx512cd",
    "avx512vl",
    "avx512dq",
    "avx512bw",
    "avx512_vbmi",
    "avx512_vnni",
    "avx512_bf16",
)
AMX = ("amx_tile", "amx_int8", "amx_bf16")

_TOOLS = {
    "cmake": Tool(name="cmake", path="/usr/bin/cmake", version="3.28.3"),
    "ninja": Tool(name="ninja", path="/usr/bin/ninja", version="1.11.1"),
    "cc": Tool(name="cc", path="/usr/bin/gcc", version="12.2.0"),
    "cxx": Tool(name="cxx", path="/usr/bin/g++", version="12.2.0"),
    "ccache": Tool(name="ccache", reason="not found on PATH"),
}


def _backends(**available: str) -> dict[Backend, BackendStatus]:
    out = {b: BackendStatus(backend=b, available=False, reason=f"no {b} here") for b in Backend}
    out[Backend.CPU] = BackendStatus(backend=Backend.CPU, available=True, reason="always")
    for name, reason in available.items():
        b = Backend(name)
        out[b] = BackendStatus(backend=b, available=True, reason=reason)
    return out


def x86(
    features: tuple[str, ...], *, advertised_only: dict[str, str] | None = None, **kw: object
) -> HardwareProfile:
    cpu = CpuInfo(
        arch="x86_64",
        model="fake",
        features=tuple(sorted(features)),
        advertised_only=advertised_only or {},
    )
    return HardwareProfile(os="linux", cpu=cpu, toolchains=dict(_TOOLS), backends=_backends(), **kw)  # type: ignore[arg-type]


AVX512_SERVER = x86((*X86_BASE, "avx_vnni", *AVX512, *AMX))
AVX2_DESKTOP = x86(X86_BASE)
PRE_AVX = x86(("sse4_2",))
AVX512_HIDDEN_BY_OS = x86(
    X86_BASE, advertised_only=dict.fromkeys(AVX512, "XCR0=0x7 does not enable ZMM state")
)

H100 = GpuInfo(
    vendor="nvidia",
    name="NVIDIA H100 80GB HBM3",
    memory_bytes=80 << 30,
    compute_capability="9.0",
    driver_version="550.54",
)
NVCC = Tool(name="nvcc", path="/usr/local/cuda/bin/nvcc", version="12.4")
CUDA_BOX = HardwareProfile(
    os="linux",
    cpu=AVX2_DESKTOP.cpu,
    gpus=(H100,),
    toolchains={**_TOOLS, "nvcc": NVCC},
    backends=_backends(cuda="NVIDIA H100 80GB HBM3 (9.0) and CUDA 12.4"),
)
CUDA_NO_TOOLKIT = HardwareProfile(
    os="linux",
    cpu=AVX2_DESKTOP.cpu,
    gpus=(H100,),
    toolchains=dict(_TOOLS),
    backends={
        **_backends(),
        Backend.CUDA: BackendStatus(
            backend=Backend.CUDA,
            available=False,
            reason="NVIDIA GPU found (NVIDIA H100 80GB HBM3) "
            "but no CUDA toolkit (nvcc) to build with",
        ),
    },
)
APPLE_M2 = HardwareProfile(
    os="darwin",
    cpu=CpuInfo(arch="arm64", model="Apple M2", features=("dotprod", "fp16", "i8mm", "neon")),
    gpus=(GpuInfo(vendor="apple", name="Apple M2"),),
    toolchains=dict(_TOOLS),
    backends=_backends(metal="Apple silicon GPU with Metal"),
)
ARM64_BOARD = HardwareProfile(
    os="linux",
    cpu=CpuInfo(arch="aarch64", model="Cortex-A76", features=("dotprod", "fp16", "neon")),
    toolchains=dict(_TOOLS),
    backends=_backends(),
)
