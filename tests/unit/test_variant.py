"""Labels, sub-indexes and platform tags of wheel variants, from plans of fake machines."""

from __future__ import annotations

from dataclasses import replace

import pytest

from buildtools.hardware._model import Tool
from buildtools.plan import BuildOptions, make_plan
from buildtools.variant import (
    cuda_tag,
    glibc_version,
    index_name,
    plan_variant,
    platform_tag,
    variant_from_manifest,
    variant_label,
)
from tests.unit import profiles as p

PORTABLE = BuildOptions(portable=True)
CUDA13_BOX = replace(
    p.CUDA_BOX,
    toolchains={**p.CUDA_BOX.toolchains, "nvcc": Tool(name="nvcc", path="/x/nvcc", version="13.0")},
)


@pytest.mark.parametrize(
    ("version", "tag"), [("13.0", "cu130"), ("12.4", "cu124"), ("12.8.93", "cu128"), (None, "cuda")]
)
def test_cuda_tag(version: str | None, tag: str) -> None:
    assert cuda_tag(version) == tag


def test_labels_and_sub_indexes() -> None:
    assert variant_label("cpu", portable=False) == "cpu"
    assert variant_label("cpu", portable=True) == "cpu.portable"
    assert variant_label("cuda", portable=True, cuda_version="13.0") == "cu130.portable"
    assert index_name("cpu.portable") == "cpu"
    assert index_name("cu130.portable") == "cu130"
    # built for one CPU: not for sharing
    assert index_name("cpu") is None
    assert index_name("cu130") is None


def test_platform_tags() -> None:
    assert platform_tag("linux", "x86_64") == "linux_x86_64"
    assert platform_tag("linux", "arm64") == "linux_aarch64"
    assert platform_tag("Darwin", "arm64") == "macosx_11_0_arm64"
    assert platform_tag("windows", "AMD64") == "win_amd64"


def test_glibc_version_parses_confstr() -> None:
    assert glibc_version("glibc 2.36") == (2, 36)
    assert glibc_version("glibc 2.17.90") == (2, 17)
    assert glibc_version("musl 1.2") is None
    assert glibc_version("") is None


def test_aarch64_portable_plan_dry_run() -> None:
    plan = make_plan(p.ARM64_BOARD, PORTABLE)
    v = plan_variant(plan, p.ARM64_BOARD, glibc=(2, 35))
    assert v.label == "cpu.portable" and v.index == "cpu"
    assert v.platform_tag == "linux_aarch64"
    assert v.manylinux_tag == "manylinux_2_35_aarch64"
    assert v.wheel_name("0.1.0", repaired=True) == (
        "llamactl_server-0.1.0+cpu.portable-py3-none-manylinux_2_35_aarch64.whl"
    )
    assert "GGML_CPU_ARM_ARCH" not in plan.cmake_defines  # the variants pick at run time


def test_cuda_portable_plan_dry_run_ships_for_every_gpu() -> None:
    plan = make_plan(CUDA13_BOX, BuildOptions(backend="cuda", portable=True))
    v = plan_variant(plan, CUDA13_BOX, glibc=(2, 36))
    assert v.label == "cu130.portable" and v.index == "cu130"
    assert v.to_json("0.1.0")["repaired_wheel"] == (
        "llamactl_server-0.1.0+cu130.portable-py3-none-manylinux_2_36_x86_64.whl"
    )
    # not only the H100 of the building machine: llama.cpp's default GPU list
    assert "CMAKE_CUDA_ARCHITECTURES" not in plan.cmake_defines
    assert "default GPU list" in plan.reasons["GGML_CUDA"]


def test_cuda_plan_for_this_machine_is_labelled_but_not_shared() -> None:
    plan = make_plan(CUDA13_BOX, BuildOptions(backend="cuda"))
    v = plan_variant(plan, CUDA13_BOX, glibc=(2, 36))
    assert v.label == "cu130" and v.index is None
    assert plan.cmake_defines["CMAKE_CUDA_ARCHITECTURES"] == "90-real"


def test_mac_has_no_manylinux_tag() -> None:
    v = plan_variant(make_plan(p.APPLE_M2, PORTABLE), p.APPLE_M2, glibc=None)
    assert v.label == "metal.portable" and v.manylinux_tag is None
    assert v.to_json("0.1.0")["repaired_wheel"] is None


def test_label_from_a_built_manifest() -> None:
    cuda = {
        "compiler": "cc=/usr/bin/gcc@12;cxx=/usr/bin/g++@12;nvcc@13.0;x86_64",
        "plan": {"backend": "cuda", "cmake_defines": {"GGML_CUDA": "ON"}},
    }
    assert variant_from_manifest(cuda) == "cu130"
    portable = {"plan": {"backend": "cpu", "cmake_defines": {"GGML_BACKEND_DL": "ON"}}}
    assert variant_from_manifest(portable) == "cpu.portable"
