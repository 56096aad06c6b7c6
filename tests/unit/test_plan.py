"""The build plan is a pure function of (profile, options): check it machine by machine."""

from __future__ import annotations

import pytest

from buildtools.errors import PlanError
from buildtools.hardware._model import Backend
from buildtools.plan import BuildOptions, BuildPlan, make_plan, parse_backend, sigill_fallback
from tests.unit import profiles as p

DEFAULT = BuildOptions()


def on(plan: BuildPlan) -> set[str]:
    return {k for k, v in plan.cmake_defines.items() if v == "ON"}


def test_every_define_has_a_reason() -> None:
    for profile in (
        p.AVX512_SERVER,
        p.AVX2_DESKTOP,
        p.PRE_AVX,
        p.CUDA_BOX,
        p.APPLE_M2,
        p.ARM64_BOARD,
    ):
        plan = make_plan(profile, DEFAULT)
        assert set(plan.reasons) == set(plan.cmake_defines)
        assert all(plan.reasons.values())


def test_avx512_server_enables_avx512_and_amx() -> None:
    plan = make_plan(p.AVX512_SERVER, DEFAULT)
    assert plan.backend is Backend.CPU
    assert {
        "GGML_AVX2",
        "GGML_AVX512",
        "GGML_AVX512_VNNI",
        "GGML_AVX512_BF16",
        "GGML_AMX_INT8",
    } <= on(plan)
    assert plan.cmake_defines["GGML_NATIVE"] == "OFF"
    assert "amx_int8" in plan.cpu_features


def test_avx2_desktop_stops_at_avx2() -> None:
    plan = make_plan(p.AVX2_DESKTOP, DEFAULT)
    assert {"GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C"} <= on(plan)
    assert plan.cmake_defines["GGML_AVX512"] == "OFF"
    assert "lacks avx512f" in plan.reasons["GGML_AVX512"]


def test_pre_avx_machine_gets_no_avx() -> None:
    plan = make_plan(p.PRE_AVX, DEFAULT)
    assert on(plan) & {"GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_AVX512"} == set()
    assert plan.cmake_defines["GGML_SSE42"] == "ON"


def test_os_disabled_avx512_is_off_with_the_reason() -> None:
    plan = make_plan(p.AVX512_HIDDEN_BY_OS, DEFAULT)
    assert plan.cmake_defines["GGML_AVX512"] == "OFF"
    assert "XCR0" in plan.reasons["GGML_AVX512"]


def test_cuda_box_builds_cuda_for_the_detected_gpu() -> None:
    plan = make_plan(p.CUDA_BOX, DEFAULT)
    assert plan.backend is Backend.CUDA
    assert plan.cmake_defines["GGML_CUDA"] == "ON"
    assert plan.cmake_defines["CMAKE_CUDA_ARCHITECTURES"] == "90-real"
    assert "H100" in plan.reasons["CMAKE_CUDA_ARCHITECTURES"]


def test_cuda_without_toolkit_falls_back_to_cpu_on_auto_and_errors_when_asked() -> None:
    assert make_plan(p.CUDA_NO_TOOLKIT, DEFAULT).backend is Backend.CPU
    with pytest.raises(PlanError, match="nvcc"):
        make_plan(p.CUDA_NO_TOOLKIT, BuildOptions(backend="cuda"))


def test_apple_silicon_builds_metal_with_arm_arch() -> None:
    plan = make_plan(p.APPLE_M2, DEFAULT)
    assert plan.backend is Backend.METAL
    assert plan.cmake_defines["GGML_METAL"] == "ON"
    assert plan.cmake_defines["GGML_CPU_ARM_ARCH"] == "armv8.2-a+dotprod+i8mm+fp16"


def test_arm64_board_is_cpu_with_dotprod() -> None:
    plan = make_plan(p.ARM64_BOARD, DEFAULT)
    assert plan.backend is Backend.CPU
    assert plan.cmake_defines["GGML_CPU_ARM_ARCH"] == "armv8.2-a+dotprod+fp16"
    assert "GGML_AVX2" not in plan.cmake_defines


def test_portable_uses_backend_dl_with_all_variants() -> None:
    plan = make_plan(p.AVX2_DESKTOP, BuildOptions(portable=True))
    assert {"GGML_BACKEND_DL", "GGML_CPU_ALL_VARIANTS", "BUILD_SHARED_LIBS"} <= on(plan)
    assert "GGML_AVX2" not in plan.cmake_defines
    assert plan.cpu_features == ()


def test_unknown_backend_is_a_clear_error() -> None:
    with pytest.raises(PlanError, match="unknown backend 'rocm'"):
        parse_backend("rocm")


def test_unavailable_backend_names_what_is_missing() -> None:
    with pytest.raises(PlanError, match="vulkan is not available"):
        make_plan(p.AVX2_DESKTOP, BuildOptions(backend="vulkan"))


def test_cache_key_changes_with_plan_source_and_compiler() -> None:
    a = make_plan(p.AVX2_DESKTOP, DEFAULT)
    b = make_plan(p.AVX512_SERVER, DEFAULT)
    key = a.cache_key(source_id="s1", compiler="gcc12")
    assert key == make_plan(p.AVX2_DESKTOP, DEFAULT).cache_key(source_id="s1", compiler="gcc12")
    assert key != b.cache_key(source_id="s1", compiler="gcc12")
    assert key != a.cache_key(source_id="s2", compiler="gcc12")
    assert key != a.cache_key(source_id="s1", compiler="gcc13")


def test_extra_defines_override_the_plan() -> None:
    plan = make_plan(
        p.AVX2_DESKTOP, BuildOptions(extra_defines={"GGML_AVX2": "OFF", "GGML_LTO": "ON"})
    )
    assert plan.cmake_defines["GGML_AVX2"] == "OFF"
    assert plan.reasons["GGML_LTO"] == "given with --define"


def test_sigill_gives_up_the_highest_level_first() -> None:
    plan = make_plan(p.AVX512_SERVER, DEFAULT)
    assert sigill_fallback(plan, -4) == frozenset({"amx_tile", "amx_int8", "amx_bf16"})
    no_amx = make_plan(p.AVX512_SERVER, BuildOptions(disabled_features=frozenset({"amx_tile"})))
    assert sigill_fallback(no_amx, -4) == frozenset({"avx512_vbmi", "avx512_vnni", "avx512_bf16"})
    assert sigill_fallback(plan, 1) is None
    assert sigill_fallback(plan, -11) is None
    retry = make_plan(p.AVX512_SERVER, BuildOptions(disabled_features=frozenset({"avx512f"})))
    assert retry.cmake_defines["GGML_AVX512"] == "OFF"
    assert retry.cmake_defines["GGML_AVX512_VNNI"] == "OFF"
    assert "turned off" in retry.reasons["GGML_AVX512"]


def test_ccache_does_not_change_the_cache_key() -> None:
    with_ccache = make_plan(p.AVX2_DESKTOP, DEFAULT)
    without = make_plan(p.AVX2_DESKTOP, BuildOptions(extra_defines={"GGML_CCACHE": "ON"}))
    assert with_ccache.cmake_defines["GGML_CCACHE"] != without.cmake_defines["GGML_CCACHE"]
    assert with_ccache.cache_key(source_id="s", compiler="c") == without.cache_key(
        source_id="s", compiler="c"
    )
