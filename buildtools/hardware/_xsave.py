"""Does the OS let a process use the register state an x86 extension needs?

CPUID says what the silicon can do; XCR0 says which register files the OS
saves on a context switch, and an instruction touching state XCR0 leaves off
raises #UD: "Illegal instruction", the most common complaint about prebuilt
llama.cpp binaries. Hypervisors and ``noxsave``-style boot options do leave
AVX-512 advertised while its ZMM state is off. AMX needs one more step on
Linux 5.16+: each process must ask the kernel for tile-data permission with
``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`` (kernel
``Documentation/arch/x86/xstate.rst``); ggml-cpu's ``amx_init()`` makes the
same request, so a refusal here means its AMX kernels would be refused too.

XGETBV is an instruction, not a syscall, so reading XCR0 means running
machine code. That happens in a child Python (through the runner) so that a
SIGILL or a W^X policy refusing the executable page costs only this probe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
from dataclasses import dataclass
from pathlib import Path

from buildtools._runner import Runner
from buildtools.paths import write_json_atomic

__all__ = ["XsaveState", "gate_features", "read_xsave_state", "read_xsave_state_once_per_boot"]

# The child checks CPUID.1:ECX.OSXSAVE (bit 27) before XGETBV, which would
# itself fault without it. Machine code, x86-64 SysV:
#   cpuid1_ecx: push rbx; mov eax,1; xor ecx,ecx; cpuid; mov eax,ecx; pop rbx; ret
#   xgetbv0:    xor ecx,ecx; xgetbv; shl rdx,32; or rax,rdx; ret
# arch_prctl is syscall 158 on x86-64; 0x1023 = ARCH_REQ_XCOMP_PERM, 18 = XTILEDATA.
_CHILD = """
import ctypes, json, mmap
pages = []
def native(code, restype):
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(bytes.fromhex(code))
    pages.append(page)
    return ctypes.CFUNCTYPE(restype)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
ecx = native("53b80100000031c90fa289c85bc3", ctypes.c_uint32)()
out = {"osxsave": bool(ecx >> 27 & 1)}
if out["osxsave"]:
    out["xcr0"] = native("31c90f01d048c1e2204809d0c3", ctypes.c_uint64)()
    if out["xcr0"] >> 17 & 3 == 3:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        rc = libc.syscall(ctypes.c_long(158), ctypes.c_long(0x1023), ctypes.c_long(18))
        out["amx_errno"] = 0 if rc == 0 else ctypes.get_errno()
print(json.dumps(out))
"""

_YMM = 0b110  # XCR0 bits 1-2: SSE and AVX (YMM upper halves)
_ZMM = 0b1110_0000  # bits 5-7: opmask, ZMM_Hi256, Hi16_ZMM
_AMX = 0b11 << 17  # bits 17-18: XTILECFG, XTILEDATA

_NEEDS_YMM = frozenset({"avx", "avx2", "fma", "f16c", "avx_vnni"})
_AMX_FEATURES = frozenset({"amx_tile", "amx_int8", "amx_bf16"})


@dataclass(frozen=True, kw_only=True)
class XsaveState:
    """What the child learned; ``xcr0`` is ``None`` when the OS has not enabled XSAVE."""

    osxsave: bool
    xcr0: int | None = None
    amx_errno: int | None = None
    """0 when the kernel granted AMX tile data; ``None`` when not asked."""


def read_xsave_state(runner: Runner, python: str) -> XsaveState | str:
    """XCR0 and the AMX permission as seen by a child process, or why not."""
    # -I -S: no user site, no PYTHON* variables, no site import: nothing but the snippet
    result = runner([python, "-I", "-S", "-c", _CHILD], timeout=15)
    if not result.ok:
        detail = result.stderr.strip().splitlines()[-1:] or [""]
        return f"XCR0 probe exited with status {result.returncode} {detail[0]}".rstrip()
    try:
        raw = json.loads(result.stdout)
        xcr0 = raw.get("xcr0")
        amx = raw.get("amx_errno")
        return XsaveState(
            osxsave=bool(raw["osxsave"]),
            xcr0=None if xcr0 is None else int(xcr0),
            amx_errno=None if amx is None else int(amx),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"XCR0 probe printed something unexpected ({exc})"


_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def read_xsave_state_once_per_boot(
    runner: Runner, python: str, store: Path, *, boot_id_file: Path = _BOOT_ID
) -> XsaveState | str:
    """:func:`read_xsave_state`, remembered in *store* until the machine reboots.

    XCR0 is set by the kernel at boot and the AMX permission policy with it,
    so the child (~25 ms of a Python start) runs once per boot instead of on
    every ``llamactl serve``. The record is keyed by the kernel's boot id; a
    failed probe is never recorded.
    """
    try:
        boot_id = boot_id_file.read_text().strip()
    except OSError:
        return read_xsave_state(runner, python)
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        doc = json.loads(store.read_text())
        if doc["boot_id"] == boot_id:
            return XsaveState(**doc["state"])
    state = read_xsave_state(runner, python)
    if isinstance(state, XsaveState):
        with contextlib.suppress(OSError):
            write_json_atomic(store, {"boot_id": boot_id, "state": dataclasses.asdict(state)})
    return state


def _errno_text(code: int) -> str:
    name = errno.errorcode.get(code, str(code))
    if code == errno.EINVAL:
        return f"{name}: kernel older than 5.16 or without AMX support"
    return name


def gate_features(features: frozenset[str], state: XsaveState) -> dict[str, str]:
    """The subset of ``features`` this process may not use, each with the reason."""
    refused: dict[str, str] = {}
    # AVX-512 also needs the YMM bits: its encodings extend the AVX state.
    needs = {f: _YMM for f in features if f in _NEEDS_YMM}
    needs |= {f: _YMM | _ZMM for f in features if f.startswith("avx512")}
    needs |= {f: _AMX for f in features if f in _AMX_FEATURES}
    if not state.osxsave or state.xcr0 is None:
        for f in sorted(needs):
            refused[f] = f"CPU reports {f} but the OS has not enabled XSAVE (CPUID.1:ECX.OSXSAVE=0)"
        return refused
    xcr0 = state.xcr0
    for f, mask in sorted(needs.items()):
        if xcr0 & mask & _YMM != mask & _YMM:
            refused[f] = f"CPU reports {f} but XCR0={xcr0:#x} does not enable YMM (AVX) state"
        elif xcr0 & mask & _ZMM != mask & _ZMM:
            refused[f] = f"CPU reports {f} but XCR0={xcr0:#x} does not enable ZMM state"
        elif xcr0 & mask & _AMX != mask & _AMX:
            refused[f] = f"CPU reports {f} but XCR0={xcr0:#x} does not enable AMX tile state"
        elif mask == _AMX and state.amx_errno:
            refused[f] = (
                f"CPU reports {f} but the kernel refused AMX tile data permission "
                f"(arch_prctl ARCH_REQ_XCOMP_PERM: {_errno_text(state.amx_errno)})"
            )
    return refused
