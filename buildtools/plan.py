"""From a hardware profile and the user's options to cmake defines, each with a reason.

:func:`make_plan` is a pure function: the same profile and options always give
the same plan, which is what lets the plan be unit-tested against a table of
fake machines and used as a cache key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from buildtools.errors import PlanError
from buildtools.hardware._model import Backend, HardwareProfile

__all__ = [
    "DEFAULT_TARGETS",
    "NOT_IN_KEY",
    "BuildOptions",
    "BuildPlan",
    "make_plan",
    "parse_backend",
    "sigill_fallback",
]

#: the server, its benchmark, the RPC worker that lends this machine's devices to
#: another machine's server, and llama.cpp's own memory fit (the estimator's oracle)
DEFAULT_TARGETS = ("llama-server", "llama-bench", "ggml-rpc-server", "llama-fit-params")
#: bump when the meaning of a plan changes, so old cache entries are not reused
PLAN_SCHEMA = 1
#: defines that change how the build runs but not what it produces
NOT_IN_KEY = frozenset({"GGML_CCACHE"})

# (cmake option, CPU features it needs). Order matters: it is also the order
# in which features are given up when a verified run dies with SIGILL.
_X86_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    # ggml's GGML_AVX512 compiles with -mavx512f/cd/vl/dq/bw together
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512_vbmi",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",)),
    ("GGML_AMX_TILE", ("amx_tile",)),
    ("GGML_AMX_INT8", ("amx_int8",)),
    ("GGML_AMX_BF16", ("amx_bf16",)),
)
#: options that only make sense on top of another
_X86_REQUIRES = {
    "GGML_AVX2": "GGML_AVX",
    "GGML_AVX512": "GGML_AVX2",
    "GGML_AVX512_VBMI": "GGML_AVX512",
    "GGML_AVX512_VNNI": "GGML_AVX512",
    "GGML_AVX512_BF16": "GGML_AVX512",
    "GGML_AMX_TILE": "GGML_AVX512",
    "GGML_AMX_INT8": "GGML_AMX_TILE",
    "GGML_AMX_BF16": "GGML_AMX_TILE",
}
#: groups given up together after SIGILL, newest first (see sigill_fallback)
_FALLBACK_LEVELS = (
    ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"),
    ("GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"),
    ("GGML_AVX512",),
    ("GGML_AVX_VNNI",),
    ("GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2"),
    ("GGML_AVX",),
)
#: arm64 extensions mapped onto -march modifiers for GGML_CPU_ARM_ARCH
_ARM_MODIFIERS = (("dotprod", "dotprod"), ("i8mm", "i8mm"), ("sve", "sve"), ("fp16", "fp16"))


def parse_backend(value: str) -> Backend | None:
    """``auto`` → ``None``; a backend name → that backend; else :class:`PlanError`."""
    match value.strip().lower():
        case "auto":
            return None
        case name if name in {b.value for b in Backend}:
            return Backend(name)
        case other:
            choices = ", ".join(["auto", *(b.value for b in Backend)])
            raise PlanError(f"unknown backend {other!r}", hint=f"choose one of: {choices}")


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """What the user asked for; everything else is derived from the machine."""

    backend: str = "auto"
    """``auto`` picks the best available backend; or cpu, cuda, metal, opencl, vulkan."""
    portable: bool = False
    """Build every CPU variant as loadable backends and pick the best at run time."""
    native: bool = False
    """Target exactly this CPU (``-march=native``) instead of explicit instruction sets."""
    disabled_features: frozenset[str] = frozenset()
    """CPU features to leave out even though detected (set after a failed verification)."""
    extra_defines: Mapping[str, str] = field(default_factory=dict)
    """Additional ``-D`` defines; they override the plan's."""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    build_type: str = "Release"


@dataclass(frozen=True, kw_only=True)
class BuildPlan:
    """The resolved build: cmake defines with their reasons and the targets."""

    backend: Backend
    cmake_defines: dict[str, str]
    reasons: dict[str, str]
    targets: tuple[str, ...]
    cpu_features: tuple[str, ...]
    """CPU features the binary will require at run time."""

    def identity(self, *, source_id: str, compiler: str) -> dict[str, Any]:
        return {
            "schema": PLAN_SCHEMA,
            "source": source_id,
            "compiler": compiler,
            "defines": {k: v for k, v in sorted(self.cmake_defines.items()) if k not in NOT_IN_KEY},
            "targets": sorted(self.targets),
        }

    def cache_key(self, *, source_id: str, compiler: str) -> str:
        """Content address of the build: same source, plan and compiler, same key."""
        blob = json.dumps(self.identity(source_id=source_id, compiler=compiler), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def to_json(self, *, source_id: str, compiler: str) -> dict[str, Any]:
        return {
            "backend": str(self.backend),
            "cmake_defines": dict(self.cmake_defines),
            "reasons": dict(self.reasons),
            "targets": list(self.targets),
            "cpu_features": list(self.cpu_features),
            "cache_key": self.cache_key(source_id=source_id, compiler=compiler),
        }


_AUTO_ORDER = (Backend.CUDA, Backend.METAL, Backend.VULKAN, Backend.OPENCL, Backend.CPU)


def _choose_backend(profile: HardwareProfile, requested: Backend | None) -> tuple[Backend, str]:
    if requested is not None:
        if requested is Backend.CPU:
            return requested, "asked for with --backend cpu"
        status = profile.backends.get(requested)
        if status is None or not status.available:
            why = status.reason if status else "not detected"
            raise PlanError(
                f"backend {requested} is not available on this machine: {why}",
                hint="run `llamactl detect` to see what is missing, or use --backend auto",
            )
        return requested, f"asked for with --backend {requested}: {status.reason}"
    for backend in _AUTO_ORDER:
        if backend is Backend.CPU:
            return backend, "no GPU backend is available here (see `llamactl detect`)"
        status = profile.backends.get(backend)
        if status is not None and status.available:
            return backend, f"best available backend: {status.reason}"
    raise AssertionError("unreachable: the CPU backend is always last")


class _Defines:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.reasons: dict[str, str] = {}

    def set(self, name: str, value: str | bool, reason: str) -> None:
        self.values[name] = ("ON" if value else "OFF") if isinstance(value, bool) else value
        self.reasons[name] = reason


def _x86_cpu(d: _Defines, profile: HardwareProfile, options: BuildOptions) -> tuple[str, ...]:
    cpu = profile.cpu
    used: list[str] = []
    enabled: set[str] = set()
    for option, needs in _X86_OPTIONS:
        missing = [f for f in needs if not cpu.has(f)]
        advertised = [f for f in needs if f in cpu.advertised_only]
        turned_off = [f for f in needs if f in options.disabled_features]
        parent = _X86_REQUIRES.get(option)
        if turned_off:
            d.set(
                option,
                False,
                f"{', '.join(turned_off)} turned off after a verified run failed here",
            )
        elif advertised:
            f = advertised[0]
            d.set(
                option,
                False,
                f"CPU advertises {f} but it cannot be used here: {cpu.advertised_only[f]}",
            )
        elif missing:
            d.set(option, False, f"this CPU lacks {', '.join(missing)}")
        elif parent is not None and parent not in enabled:
            d.set(option, False, f"needs {parent}, which is off")
        else:
            d.set(option, True, f"CPU and OS support {', '.join(needs)}")
            enabled.add(option)
            used.extend(needs)
    return tuple(sorted(set(used)))


def _arm_cpu(d: _Defines, profile: HardwareProfile, options: BuildOptions) -> tuple[str, ...]:
    cpu = profile.cpu
    mods = [
        m
        for feature, m in _ARM_MODIFIERS
        if cpu.has(feature) and feature not in options.disabled_features
    ]
    arch = "armv8.2-a" if mods else "armv8-a"
    d.set(
        "GGML_CPU_ARM_ARCH",
        "+".join([arch, *mods]),
        "explicit -march from the detected extensions"
        + (f" ({', '.join(mods)})" if mods else " (none beyond baseline NEON)"),
    )
    return tuple(sorted(f for f, _ in _ARM_MODIFIERS if f in mods))


def _backend_defines(
    d: _Defines, profile: HardwareProfile, backend: Backend, reason: str, *, portable: bool
) -> None:
    match backend:
        case Backend.CPU:
            pass
        case Backend.CUDA:
            d.set("GGML_CUDA", True, reason)
            nvcc = profile.tool("nvcc")
            if nvcc.path:
                d.set(
                    "CMAKE_CUDA_COMPILER",
                    nvcc.path,
                    f"CUDA toolkit {nvcc.version or ''} found here".strip(),
                )
            caps = sorted({g.compute_capability for g in profile.gpus if g.compute_capability})
            if portable:
                # left unset: llama.cpp's own list (PTX for 75/80/90 and device code for
                # the common GPUs), so the wheel runs on GPUs this machine does not have
                d.set("GGML_CUDA", True, f"{reason}; portable: llama.cpp's default GPU list")
            elif caps:
                archs = ";".join(f"{c.replace('.', '')}-real" for c in caps)
                names = ", ".join(f"{g.name} ({g.compute_capability})" for g in profile.gpus)
                d.set(
                    "CMAKE_CUDA_ARCHITECTURES",
                    archs,
                    f"compile only for the GPUs detected: {names}",
                )
        case Backend.METAL:
            d.set("GGML_METAL", True, reason)
            d.set(
                "GGML_METAL_EMBED_LIBRARY", True, "shaders inside the binary: no .metallib to lose"
            )
        case Backend.VULKAN:
            d.set("GGML_VULKAN", True, reason)
        case Backend.OPENCL:
            d.set("GGML_OPENCL", True, reason)


def make_plan(profile: HardwareProfile, options: BuildOptions) -> BuildPlan:
    """The build plan for ``profile`` under ``options`` (pure; see module docstring)."""
    backend, backend_reason = _choose_backend(profile, parse_backend(options.backend))
    d = _Defines()
    d.set(
        "CMAKE_BUILD_TYPE",
        options.build_type,
        "optimised binaries; llama.cpp is unusably slow in Debug",
    )
    d.set(
        "LLAMA_USE_PREBUILT_UI",
        False,
        "configure would download the web UI; builds must work offline",
    )
    d.set(
        "LLAMA_OPENSSL",
        False,
        "llamactl's router faces clients; the server only serves loopback HTTP",
    )
    d.set("LLAMA_BUILD_TESTS", False, "only the server and its tools are needed")
    d.set("LLAMA_BUILD_EXAMPLES", False, "only the server and its tools are needed")
    d.set(
        "GGML_RPC",
        True,
        "ggml-rpc-server and `llama-server --rpc`: a model split across machines; "
        "it adds no device until --rpc is given",
    )
    d.set(
        "GGML_RPC_RDMA",
        False,
        "set explicitly: it would turn itself on when libibverbs happens to be installed",
    )
    ccache = profile.tool("ccache")
    d.set(
        "GGML_CCACHE",
        ccache.found,
        f"ccache {ccache.version or ''} found: rebuilds of unchanged files are free".replace(
            "  ", " "
        )
        if ccache.found
        else "ccache not installed (install it to make rebuilds cheap)",
    )

    arch = profile.cpu.arch
    x86 = arch in {"x86_64", "amd64", "i686", "x86"}
    arm = arch in {"arm64", "aarch64"}
    cpu_features: tuple[str, ...] = ()
    if options.portable:
        d.set("GGML_NATIVE", False, "portable: must run on any CPU of this architecture")
        d.set("BUILD_SHARED_LIBS", True, "backend-DL needs the CPU variants as shared libraries")
        d.set("GGML_BACKEND_DL", True, "load the best CPU variant at run time")
        d.set("GGML_CPU_ALL_VARIANTS", True, "one CPU backend per instruction-set level")
        d.set("CMAKE_BUILD_WITH_INSTALL_RPATH", True, "libraries sit beside the binary ($ORIGIN)")
        d.set(
            "CMAKE_INSTALL_RPATH",
            "$ORIGIN",
            "find ggml/llama libraries next to llama-server wherever installed",
        )
    elif options.native:
        d.set(
            "GGML_NATIVE",
            True,
            "--native: let the compiler target exactly this CPU (-march=native)",
        )
        d.set("BUILD_SHARED_LIBS", False, "one self-contained binary the cache can move and reuse")
        cpu_features = profile.cpu.features
    else:
        d.set(
            "GGML_NATIVE",
            False,
            "explicit instruction sets below, each checked against this CPU and OS, "
            "instead of -march=native which hides what the binary needs",
        )
        d.set("BUILD_SHARED_LIBS", False, "one self-contained binary the cache can move and reuse")
        if x86:
            cpu_features = _x86_cpu(d, profile, options)
        elif arm:
            cpu_features = _arm_cpu(d, profile, options)

    _backend_defines(d, profile, backend, backend_reason, portable=options.portable)
    for name, value in options.extra_defines.items():
        d.set(name, value, "given with --define")
    return BuildPlan(
        backend=backend,
        cmake_defines=d.values,
        reasons=d.reasons,
        targets=tuple(options.targets),
        cpu_features=cpu_features,
    )


def sigill_fallback(plan: BuildPlan, returncode: int | None) -> frozenset[str] | None:
    """CPU features to give up after a verification run ended with ``returncode``.

    Only SIGILL earns a retry: it means the binary used an instruction the
    machine would not execute. The highest enabled x86 level goes first, as
    a whole (all of AMX, then the AVX-512 extensions, ...), since the newest
    extensions are the ones OSes and hypervisors hide.
    """
    if returncode is None or returncode != -4:  # -SIGILL from subprocess
        return None
    needs = dict(_X86_OPTIONS)
    for level in _FALLBACK_LEVELS:
        enabled = [option for option in level if plan.cmake_defines.get(option) == "ON"]
        if enabled:
            return frozenset(f for option in enabled for f in needs[option])
    return None
