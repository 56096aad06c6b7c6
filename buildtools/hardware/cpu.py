"""The CPU: which instruction-set extensions a build may target here.

Where the feature list comes from, by OS:

* Linux: ``/proc/cpuinfo``. The kernel clears a flag when it disabled the
  state the extension needs (``arch/x86/kernel/fpu/xstate.c``) and lists
  only the HWCAPs it enabled on arm64, so this is already the OS's view, and
  reading a file is ~1000x cheaper than py-cpuinfo (which spawns a process).
  On x86 XCR0 is still read (see ``_xsave``): hypervisors can leave flags the
  guest kernel trusts, and AMX needs a per-process permission that
  ``/proc/cpuinfo`` cannot show.
* macOS: ``sysctl hw.optional`` and ``machdep.cpu.*``, which xnu fills from
  what it enables.
* anything else: py-cpuinfo, which reads CPUID directly, i.e. what the CPU
  advertises; the OS check is then left to the verified run after the build.

Names are normalised to the spelling ggml's CMake options use (``avx512_vbmi``
for the kernel's ``avx512vbmi``, ``dotprod`` for ``asimddp``...).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from buildtools import paths
from buildtools._runner import Runner, capture
from buildtools.hardware._model import Backend, BackendStatus, CpuInfo, PlatformInfo
from buildtools.hardware._probe import BackendReport, ProbeContext, missing_build_tools
from buildtools.hardware._xsave import (
    XsaveState,
    gate_features,
    read_xsave_state,
    read_xsave_state_once_per_boot,
)

__all__ = ["CPU_FEATURES", "CpuBackend", "normalise_features", "probe_cpu"]

#: every spelling seen in /proc/cpuinfo, sysctl or py-cpuinfo -> ggml's name
_ALIASES: Mapping[str, str] = {
    "sse4_2": "sse4_2", "sse4.2": "sse4_2",
    "avx": "avx", "avx1.0": "avx", "avx1_0": "avx",
    "avx2": "avx2", "avx2_0": "avx2",
    "bmi2": "bmi2", "fma": "fma", "f16c": "f16c",
    "avx_vnni": "avx_vnni", "avxvnni": "avx_vnni",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl",
    "avx512dq": "avx512dq", "avx512cd": "avx512cd",
    "avx512vbmi": "avx512_vbmi", "avx512_vbmi": "avx512_vbmi",
    "avx512vnni": "avx512_vnni", "avx512_vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16", "avx512_bf16": "avx512_bf16",
    "amx_tile": "amx_tile", "amx-tile": "amx_tile", "amxtile": "amx_tile",
    "amx_int8": "amx_int8", "amx-int8": "amx_int8", "amxint8": "amx_int8",
    "amx_bf16": "amx_bf16", "amx-bf16": "amx_bf16", "amxbf16": "amx_bf16",
    # arm: Linux HWCAP names, macOS sysctl names (after dropping arm./feat_)
    "neon": "neon", "asimd": "neon", "advsimd": "neon",
    "asimddp": "dotprod", "dotprod": "dotprod",
    "i8mm": "i8mm", "sve": "sve", "sve2": "sve2", "sme": "sme",
    "asimdhp": "fp16", "fp16": "fp16", "neon_fp16": "fp16",
}  # fmt: skip
#: the names a build plan may see in ``CpuInfo.features``
CPU_FEATURES = frozenset(_ALIASES.values())

_ARM_VENDORS = {
    "0x41": "ARM", "0x42": "Broadcom", "0x43": "Cavium", "0x46": "Fujitsu",
    "0x48": "HiSilicon", "0x4e": "NVIDIA", "0x51": "Qualcomm", "0x61": "Apple",
    "0x6d": "Microsoft", "0xc0": "Ampere",
}  # fmt: skip

_SYSCTL_KEYS = (
    "hw.optional",
    "machdep.cpu.brand_string",
    "machdep.cpu.vendor",
    "machdep.cpu.features",
    "machdep.cpu.leaf7_features",
    "sysctl.proc_translated",
)


def normalise_features(raw: Iterable[str]) -> frozenset[str]:
    """ggml's names for the extensions in ``raw``; names ggml has no option for are dropped."""
    return frozenset(_ALIASES[n] for n in (r.strip().lower() for r in raw) if n in _ALIASES)


@dataclass(frozen=True)
class _Seen:
    """What one source said, before the OS check."""

    features: frozenset[str]
    model: str = "unknown"
    vendor: str = "unknown"
    notes: tuple[str, ...] = ()


def _parse_proc_cpuinfo(text: str) -> _Seen | None:
    """Intersect the flags of every processor: a build must run on all of them."""
    blocks = [
        {
            key.strip().lower(): value.strip()
            for key, sep, value in (line.partition(":") for line in block.splitlines())
            if sep
        }
        for block in text.split("\n\n")
    ]
    flag_sets = [
        set(b.get("flags", b.get("features", "")).split())
        for b in blocks
        if "flags" in b or "features" in b
    ]
    if not flag_sets:
        return None
    first = next(b for b in blocks if "flags" in b or "features" in b)
    vendor = first.get("vendor_id") or _ARM_VENDORS.get(first.get("cpu implementer", ""), "unknown")
    model = first.get("model name") or first.get("hardware") or "unknown"
    if model == "unknown" and "cpu part" in first:
        model = f"{vendor} part {first['cpu part']}"
    return _Seen(normalise_features(set.intersection(*flag_sets)), model=model, vendor=vendor)


def _parse_sysctl(text: str, machine: str) -> _Seen:
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    raw: set[str] = set()
    for key, value in values.items():
        if key.startswith("hw.optional.") and value == "1":
            name = key.removeprefix("hw.optional.").lower()
            raw.add(name.removeprefix("arm.").removeprefix("feat_"))
    for key in ("machdep.cpu.features", "machdep.cpu.leaf7_features"):
        raw.update(values.get(key, "").split())
    notes: tuple[str, ...] = ()
    if values.get("sysctl.proc_translated") == "1":
        notes = (
            "this Python runs under Rosetta 2 (x86_64 emulated on Apple silicon): "
            "builds target x86_64 and cannot use Metal; use an arm64 Python",
        )
    vendor = values.get("machdep.cpu.vendor") or ("Apple" if machine == "arm64" else "unknown")
    model = values.get("machdep.cpu.brand_string") or "unknown"
    return _Seen(normalise_features(raw), model=model, vendor=vendor, notes=notes)


def _read_py_cpuinfo(reader: Callable[[], Mapping[str, Any]]) -> _Seen | None:
    try:
        info = reader()
        flags = [str(f) for f in info.get("flags", [])]
    except Exception:  # py-cpuinfo can fail in many ways; the probe must not
        return None
    return _Seen(
        normalise_features(flags),
        model=str(info.get("brand_raw") or "unknown"),
        vendor=str(info.get("vendor_id_raw") or "unknown"),
        notes=("features read from CPUID by py-cpuinfo; OS support not checked",),
    )


def _default_cpuinfo_reader() -> Mapping[str, Any]:
    import cpuinfo

    result: Mapping[str, Any] = cpuinfo.get_cpu_info()
    return result


def _logical_cpus() -> int | None:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def _see(
    plat: PlatformInfo,
    runner: Runner,
    proc_root: Path,
    cpuinfo_reader: Callable[[], Mapping[str, Any]],
) -> _Seen:
    if plat.system == "linux":
        try:
            text = (proc_root / "proc" / "cpuinfo").read_text(errors="replace")
        except OSError:
            text = ""
        if seen := _parse_proc_cpuinfo(text):
            return seen
    if plat.system == "darwin":
        result = runner(["sysctl", *_SYSCTL_KEYS], timeout=10)
        if result.stdout.strip():  # sysctl exits 1 for any key this Mac lacks
            return _parse_sysctl(result.stdout, plat.machine)
    if seen := _read_py_cpuinfo(cpuinfo_reader):
        return seen
    return _Seen(frozenset(), notes=("no source of CPU features could be read",))


def probe_cpu(
    *,
    runner: Runner = capture,
    proc_root: Path = Path("/"),
    platform_info: PlatformInfo | None = None,
    python: str | None = None,
    cpuinfo_reader: Callable[[], Mapping[str, Any]] | None = None,
) -> CpuInfo:
    """The CPU and the extensions this process may use; never raises.

    ``python`` runs the XCR0 child on Linux x86 (default: this interpreter,
    unless it is a frozen application, whose executable would not understand
    ``-c``); ``cpuinfo_reader`` stands in for ``cpuinfo.get_cpu_info`` where
    neither ``/proc`` nor sysctl answers.
    """
    plat = platform_info or PlatformInfo.current()
    seen = _see(plat, runner, proc_root, cpuinfo_reader or _default_cpuinfo_reader)
    notes = list(seen.notes)
    refused: dict[str, str] = {}
    if python is None and not getattr(sys, "frozen", False):
        python = sys.executable
    if plat.is_x86 and plat.system == "linux":
        if not python:
            state: XsaveState | str = "no Python to run it in"
        elif runner is capture and proc_root == Path("/"):  # this machine, probed for real
            store = paths.home() / "xsave.json"
            state = read_xsave_state_once_per_boot(runner, python, store)
        else:
            state = read_xsave_state(runner, python)
        if isinstance(state, str):
            notes.append(f"XCR0 could not be read ({state}); features are not checked against it")
        else:
            refused = gate_features(seen.features, state)
    return CpuInfo(
        arch=plat.machine,
        model=seen.model,
        vendor=seen.vendor,
        cores=_logical_cpus(),
        features=tuple(sorted(seen.features - refused.keys())),
        advertised_only=dict(sorted(refused.items())),
        notes=tuple(notes),
    )


class CpuBackend:
    """The CPU backend: buildable wherever CMake and the compilers are."""

    backend = Backend.CPU

    def probe(self, ctx: ProbeContext) -> BackendReport:
        if missing := missing_build_tools(ctx):
            return BackendReport(
                status=BackendStatus(backend=self.backend, available=False, reason=missing)
            )
        cpu, cc = ctx.cpu, ctx.tool("cc")
        usable = f"{len(cpu.features)} instruction-set extensions usable"
        if not cpu.features:
            usable = "no SIMD extension beyond the baseline"
        reason = f"{cpu.arch} {cpu.model}, {usable}; C compiler {cc.path} {cc.version or ''}"
        return BackendReport(
            status=BackendStatus(backend=self.backend, available=True, reason=reason.rstrip())
        )
