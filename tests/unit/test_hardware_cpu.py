"""CPU probe on fake machines: /proc/cpuinfo trees, XCR0 child answers, sysctl output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from buildtools._runner import Completed
from buildtools.hardware import CpuInfo, PlatformInfo
from buildtools.hardware.cpu import CPU_FEATURES, normalise_features, probe_cpu
from tests.unit.hardware_fakes import (
    FAKE_PYTHON,
    LINUX_ARM,
    LINUX_X86,
    MAC_ARM,
    MAC_X86,
    WINDOWS,
    FakeRunner,
    proc_tree,
    x86_cpuinfo,
    xsave,
)

SAPPHIRE_RAPIDS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr "
    "sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc pni pclmulqdq ssse3 fma cx16 pcid "
    "sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm "
    "3dnowprefetch fsgsbase bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap "
    "avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves "
    "avx_vnni avx512_bf16 wbnoinvd arat avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes "
    "vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid cldemote movdiri movdir64b "
    "serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile amx_int8 arch_capabilities"
)
COFFEE_LAKE = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx "
    "fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc pni pclmulqdq ssse3 fma "
    "cx16 xtpr pdcm pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand lahf_lm abm "
    "3dnowprefetch fsgsbase bmi1 avx2 smep bmi2 erms invpcid mpx rdseed adx smap clflushopt "
    "xsaveopt xsavec xgetbv1 xsaves"
)
WESTMERE = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx "
    "fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc pni pclmulqdq dtes64 "
    "monitor ds_cpl vmx smx est tm2 ssse3 cx16 xtpr pdcm pcid dca sse4_1 sse4_2 popcnt aes lahf_lm"
)
GRAVITON3 = """processor\t: {n}
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs \
paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd40
CPU revision\t: 1
"""
AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
AVX512_EXTRA = {"avx512_vbmi", "avx512_vnni", "avx512_bf16"}
AVX2_SET = {"sse4_2", "avx", "avx2", "bmi2", "fma", "f16c"}
AMX = {"amx_tile", "amx_int8", "amx_bf16"}


def linux_x86(
    tmp_path: Path, flags: str, child: str | Completed, **kw: Any
) -> tuple[CpuInfo, FakeRunner]:
    runner = FakeRunner({"python": child})
    root = proc_tree(tmp_path, x86_cpuinfo(flags, **kw))
    cpu = probe_cpu(runner=runner, proc_root=root, platform_info=LINUX_X86, python=FAKE_PYTHON)
    return cpu, runner


def no_py_cpuinfo() -> dict[str, Any]:
    raise AssertionError("py-cpuinfo must not be consulted when /proc/cpuinfo answers")


def test_avx512_server_with_amx_granted(tmp_path: Path) -> None:
    cpu, runner = linux_x86(
        tmp_path, SAPPHIRE_RAPIDS, xsave(0x600E7, amx_errno=0), model="Xeon 8480+"
    )
    assert set(cpu.features) == AVX2_SET | {"avx_vnni"} | AVX512 | AVX512_EXTRA | AMX
    assert cpu.advertised_only == {}
    assert cpu.model == "Xeon 8480+"
    assert cpu.vendor == "GenuineIntel"
    assert cpu.arch == "x86_64"
    assert list(cpu.features) == sorted(cpu.features)
    assert runner.calls[0][0] == FAKE_PYTHON
    assert "0f01d0" in runner.calls[0][-1]  # the XGETBV opcode


def test_avx2_desktop(tmp_path: Path) -> None:
    cpu, _ = linux_x86(tmp_path, COFFEE_LAKE, xsave(0x7))
    assert set(cpu.features) == AVX2_SET
    assert cpu.advertised_only == {}
    assert cpu.notes == ()


def test_pre_avx_cpu(tmp_path: Path) -> None:
    cpu, _ = linux_x86(tmp_path, WESTMERE, xsave(0x3))
    assert cpu.features == ("sse4_2",)
    assert not cpu.has("avx")


def test_xcr0_without_zmm_state_moves_avx512_to_advertised_only(tmp_path: Path) -> None:
    cpu, _ = linux_x86(tmp_path, SAPPHIRE_RAPIDS, xsave(0x7))
    assert set(cpu.features) == AVX2_SET | {"avx_vnni"}
    assert set(cpu.advertised_only) == AVX512 | AVX512_EXTRA | AMX
    assert (
        cpu.advertised_only["avx512f"]
        == "CPU reports avx512f but XCR0=0x7 does not enable ZMM state"
    )
    assert "AMX tile state" in cpu.advertised_only["amx_int8"]


def test_amx_permission_denied(tmp_path: Path) -> None:
    cpu, _ = linux_x86(tmp_path, SAPPHIRE_RAPIDS, xsave(0x600E7, amx_errno=22))
    assert set(cpu.features) >= AVX512
    assert set(cpu.advertised_only) == AMX
    reason = cpu.advertised_only["amx_tile"]
    assert "arch_prctl ARCH_REQ_XCOMP_PERM" in reason
    assert "EINVAL" in reason


def test_os_without_xsave_refuses_every_avx_extension(tmp_path: Path) -> None:
    cpu, _ = linux_x86(tmp_path, COFFEE_LAKE, xsave(None, osxsave=False))
    assert set(cpu.features) == {"sse4_2", "bmi2"}
    assert "OSXSAVE=0" in cpu.advertised_only["avx2"]


@pytest.mark.parametrize(
    "child",
    [
        Completed((), -4, "", ""),  # SIGILL in the child
        Completed((), 1, "", "PermissionError: mmap: W^X policy"),
        "not json",
    ],
)
def test_unreadable_xcr0_keeps_the_kernel_view_with_a_note(
    tmp_path: Path, child: Completed | str
) -> None:
    cpu, _ = linux_x86(tmp_path, SAPPHIRE_RAPIDS, child)
    assert set(cpu.features) >= AVX512 | AMX
    assert cpu.advertised_only == {}
    assert any("XCR0 could not be read" in n for n in cpu.notes)


def test_features_are_intersected_across_processors(tmp_path: Path) -> None:
    text = x86_cpuinfo(COFFEE_LAKE, processors=1) + "\n" + x86_cpuinfo(WESTMERE, processors=1)
    root = proc_tree(tmp_path, text)
    cpu = probe_cpu(
        runner=FakeRunner({"python": xsave(0x7)}),
        proc_root=root,
        platform_info=LINUX_X86,
        python=FAKE_PYTHON,
    )
    assert cpu.features == ("sse4_2",)


def test_arm64_proc_cpuinfo(tmp_path: Path) -> None:
    root = proc_tree(tmp_path, "\n".join(GRAVITON3.format(n=n) for n in range(4)))
    runner = FakeRunner()
    cpu = probe_cpu(
        runner=runner, proc_root=root, platform_info=LINUX_ARM, cpuinfo_reader=no_py_cpuinfo
    )
    assert set(cpu.features) == {"neon", "fp16", "dotprod", "sve", "i8mm"}
    assert cpu.vendor == "ARM"
    assert cpu.model == "ARM part 0xd40"
    assert cpu.arch == "aarch64"
    assert runner.calls == []  # no XCR0 child on arm


MAC_M2 = """hw.optional.arm.FEAT_FP16: 1
hw.optional.arm.FEAT_DotProd: 1
hw.optional.arm.FEAT_I8MM: 1
hw.optional.arm.FEAT_BF16: 1
hw.optional.arm.FEAT_SME: 0
hw.optional.AdvSIMD: 1
hw.optional.neon: 1
hw.optional.floatingpoint: 1
machdep.cpu.brand_string: Apple M2 Pro
sysctl.proc_translated: 0
"""
MAC_INTEL = """hw.optional.sse4_2: 1
hw.optional.avx1_0: 1
hw.optional.avx2_0: 1
hw.optional.bmi2: 1
hw.optional.avx512f: 0
machdep.cpu.brand_string: Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz
machdep.cpu.vendor: GenuineIntel
machdep.cpu.features: FPU VME SSE4.1 SSE4.2 POPCNT AVX1.0 RDRAND F16C FMA
machdep.cpu.leaf7_features: RDWRFSGS BMI1 AVX2 BMI2 INVPCID
"""


def test_macos_apple_silicon_sysctl(tmp_path: Path) -> None:
    runner = FakeRunner(
        {"sysctl": Completed((), 1, MAC_M2, "sysctl: unknown oid 'machdep.cpu.vendor'")}
    )
    cpu = probe_cpu(
        runner=runner, proc_root=tmp_path, platform_info=MAC_ARM, cpuinfo_reader=no_py_cpuinfo
    )
    assert set(cpu.features) == {"neon", "fp16", "dotprod", "i8mm"}
    assert cpu.model == "Apple M2 Pro"
    assert cpu.vendor == "Apple"
    assert not runner.ran("python")  # macOS gates state itself; no XCR0 child


def test_macos_intel_sysctl(tmp_path: Path) -> None:
    runner = FakeRunner({"sysctl": MAC_INTEL})
    cpu = probe_cpu(
        runner=runner, proc_root=tmp_path, platform_info=MAC_X86, cpuinfo_reader=no_py_cpuinfo
    )
    assert set(cpu.features) == AVX2_SET
    assert cpu.vendor == "GenuineIntel"


def test_rosetta_is_noted(tmp_path: Path) -> None:
    runner = FakeRunner(
        {"sysctl": MAC_INTEL.replace("hw.optional.avx512f: 0", "sysctl.proc_translated: 1")}
    )
    cpu = probe_cpu(runner=runner, proc_root=tmp_path, platform_info=MAC_X86)
    assert any("Rosetta" in n for n in cpu.notes)


def test_py_cpuinfo_fallback_elsewhere(tmp_path: Path) -> None:
    def reader() -> dict[str, Any]:
        return {
            "brand_raw": "AMD Ryzen 9 7950X",
            "vendor_id_raw": "AuthenticAMD",
            "flags": ["avx", "avx2", "avx512f", "avx512vbmi", "avx512vnni", "fma", "sse4_2"],
        }

    cpu = probe_cpu(
        runner=FakeRunner(), proc_root=tmp_path, platform_info=WINDOWS, cpuinfo_reader=reader
    )
    assert set(cpu.features) == {
        "avx",
        "avx2",
        "avx512f",
        "avx512_vbmi",
        "avx512_vnni",
        "fma",
        "sse4_2",
    }
    assert cpu.model == "AMD Ryzen 9 7950X"
    assert any("OS support not checked" in n for n in cpu.notes)


def test_linux_without_proc_falls_back_to_py_cpuinfo(tmp_path: Path) -> None:
    def reader() -> dict[str, Any]:
        return {"flags": ["avx", "avx2"], "brand_raw": "x"}

    runner = FakeRunner({"python": xsave(0xE7)})
    cpu = probe_cpu(
        runner=runner,
        proc_root=tmp_path,
        platform_info=LINUX_X86,
        python=FAKE_PYTHON,
        cpuinfo_reader=reader,
    )
    assert cpu.features == ("avx", "avx2")


def test_a_failing_py_cpuinfo_degrades_to_no_features(tmp_path: Path) -> None:
    def reader() -> dict[str, Any]:
        raise RuntimeError("cpuid unavailable")

    cpu = probe_cpu(
        runner=FakeRunner(), proc_root=tmp_path, platform_info=WINDOWS, cpuinfo_reader=reader
    )
    assert cpu.features == ()
    assert cpu.notes == ("no source of CPU features could be read",)


def test_normalise_features_spellings() -> None:
    raw = ["AVX512VBMI", "avx512_vnni", "asimddp", "asimdhp", "sse4.2", "AVX1.0", "pni", "sha_ni"]
    assert normalise_features(raw) == {
        "avx512_vbmi",
        "avx512_vnni",
        "dotprod",
        "fp16",
        "sse4_2",
        "avx",
    }
    assert {"avx512_bf16", "amx_int8", "sve2", "neon"} <= CPU_FEATURES


def test_platform_info_families() -> None:
    assert PlatformInfo(system="linux", machine="amd64").is_x86
    assert PlatformInfo(system="darwin", machine="arm64").is_arm
    assert not PlatformInfo(system="linux", machine="riscv64").is_x86


def test_xcr0_is_read_once_per_boot(tmp_path: Path) -> None:
    from buildtools.hardware._xsave import XsaveState, read_xsave_state_once_per_boot

    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    store = tmp_path / "home" / "xsave.json"
    runner = FakeRunner({"python": xsave(0xE7)})

    def read() -> XsaveState | str:
        return read_xsave_state_once_per_boot(runner, FAKE_PYTHON, store, boot_id_file=boot)

    assert read() == XsaveState(osxsave=True, xcr0=0xE7)
    assert read() == XsaveState(osxsave=True, xcr0=0xE7)
    assert len(runner.calls) == 1  # the second answer came from the record
    boot.write_text("boot-2\n")  # a reboot: the kernel may have changed XCR0
    runner.answers = {"python": xsave(0x7)}
    assert read() == XsaveState(osxsave=True, xcr0=0x7)
    assert len(runner.calls) == 2


def test_a_failed_xcr0_probe_is_not_remembered(tmp_path: Path) -> None:
    from buildtools.hardware._xsave import read_xsave_state_once_per_boot

    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    store = tmp_path / "xsave.json"
    runner = FakeRunner({})  # python "not found": exit 127
    state = read_xsave_state_once_per_boot(runner, FAKE_PYTHON, store, boot_id_file=boot)
    assert isinstance(state, str) and "status 127" in state
    assert not store.exists()
    store.write_text("{garbage")  # a corrupt record is probed over, not trusted
    runner.answers = {"python": xsave(0xE7)}
    again = read_xsave_state_once_per_boot(runner, FAKE_PYTHON, store, boot_id_file=boot)
    assert not isinstance(again, str) and again.xcr0 == 0xE7
