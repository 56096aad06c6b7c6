"""Toolchain probe: which executable wins, and what its --version banner says."""

from __future__ import annotations

from pathlib import Path

import pytest

from buildtools._runner import Completed
from buildtools.hardware.toolchains import parse_version, probe_nvcc, probe_toolchains
from tests.unit.hardware_fakes import FakeRunner, executable


@pytest.mark.parametrize(
    ("banner", "version"),
    [
        ("cmake version 3.31.6\n\nCMake suite maintained and supported by Kitware", "3.31.6"),
        ("1.11.1.git.kitware.jobserver-1\n", "1.11.1"),
        ("cc (Debian 12.2.0-14) 12.2.0\nCopyright (C) 2022", "12.2.0"),
        ("gcc (Ubuntu 13.2.0-23ubuntu4) 13.2.0\n", "13.2.0"),
        ("Debian clang version 14.0.6\nTarget: x86_64-pc-linux-gnu", "14.0.6"),
        ("Apple clang version 15.0.0 (clang-1500.3.9.4)\nTarget: arm64-apple-darwin23", "15.0.0"),
        (
            "nvcc: NVIDIA (R) Cuda compiler driver\n"
            "Cuda compilation tools, release 12.4, V12.4.131\n",
            "12.4",
        ),
        ("ccache version 4.8.2\nFeatures: file-storage", "4.8.2"),
        ("shaderc v2023.8 v2023.8\nspirv-tools v2023.2\nglslang 11.1.0-763-g76b52ebf", "2023.8"),
        ("", None),
        ("no digits here", None),
    ],
)
def test_parse_version(banner: str, version: str | None) -> None:
    assert parse_version(banner) == version


def banners(**extra: str | Completed) -> FakeRunner:
    return FakeRunner(
        {
            "cmake --version": "cmake version 3.31.6\n",
            "ninja --version": "1.12.1\n",
            "cc --version": "cc (Debian 12.2.0-14) 12.2.0\n",
            "c++ --version": "c++ (Debian 12.2.0-14) 12.2.0\n",
            "clang --version": "Debian clang version 14.0.6\n",
            "clang++ --version": "Debian clang version 14.0.6\n",
            **extra,
        }
    )


def test_cmake_and_ninja_beside_python_win_over_path(tmp_path: Path) -> None:
    venv = tmp_path / "venv" / "bin"
    system = tmp_path / "usr" / "bin"
    for name in ("cmake", "ninja"):
        executable(venv, name)
        executable(system, name)
    tools = probe_toolchains(
        banners(), {"PATH": str(system)}, python=str(venv / "python"), root=tmp_path
    )
    assert tools["cmake"].path == str(venv / "cmake")
    assert tools["cmake"].version == "3.31.6"
    assert tools["ninja"].path == str(venv / "ninja")


def test_everything_missing_says_what_to_install(tmp_path: Path) -> None:
    tools = probe_toolchains(
        FakeRunner(), {"PATH": str(tmp_path)}, python=str(tmp_path / "python"), root=tmp_path
    )
    assert set(tools) == {"cmake", "ninja", "cc", "cxx", "nvcc", "ccache", "glslc"}
    assert not any(t.found for t in tools.values())
    assert "pip install cmake" in tools["cmake"].reason
    assert "tried cc, gcc, clang" in tools["cc"].reason
    assert "CUDA toolkit" in tools["nvcc"].reason
    assert "glslc" in tools["glslc"].reason


def test_compilers_default_order(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    for name in ("gcc", "clang", "clang++"):
        executable(bin_dir, name)
    runner = banners(**{"gcc --version": "gcc (GCC) 14.1.1\n"})
    tools = probe_toolchains(
        runner, {"PATH": str(bin_dir)}, python="/nowhere/python", root=tmp_path
    )
    assert tools["cc"].path == str(bin_dir / "gcc")
    assert tools["cc"].version == "14.1.1"
    assert tools["cxx"].path == str(bin_dir / "clang++")


def test_cc_and_cxx_from_the_environment(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    for name in ("cc", "c++", "clang", "clang++", "ccache"):
        executable(bin_dir, name)
    env = {"PATH": str(bin_dir), "CC": "ccache clang", "CXX": f"{bin_dir / 'clang++'} -m64"}
    tools = probe_toolchains(banners(), env, python="/nowhere/python", root=tmp_path)
    assert tools["cc"].path == str(bin_dir / "clang")
    assert tools["cxx"].path == str(bin_dir / "clang++")
    assert tools["cxx"].version == "14.0.6"


def test_cc_pointing_nowhere_is_reported_not_silently_replaced(tmp_path: Path) -> None:
    executable(tmp_path / "bin", "cc")
    env = {"PATH": str(tmp_path / "bin"), "CC": "/opt/missing/gcc-14"}
    tools = probe_toolchains(banners(), env, python="/nowhere/python", root=tmp_path)
    assert not tools["cc"].found
    assert "$CC='/opt/missing/gcc-14' is not an executable" in tools["cc"].reason


def test_tool_whose_version_fails_is_found_with_a_reason(tmp_path: Path) -> None:
    executable(tmp_path / "bin", "ccache")
    runner = banners(**{"ccache --version": Completed((), 1, "", "ccache: broken config")})
    tools = probe_toolchains(
        runner, {"PATH": str(tmp_path / "bin")}, python="/x/python", root=tmp_path
    )
    assert tools["ccache"].found
    assert tools["ccache"].version is None
    assert tools["ccache"].reason == "version unknown: ccache: broken config"


NVCC_BANNER = "Cuda compilation tools, release 12.4, V12.4.131\n"


def test_nvcc_from_cuda_home_first(tmp_path: Path) -> None:
    home = tmp_path / "cuda-12.4"
    executable(home / "bin", "nvcc")
    executable(tmp_path / "bin", "nvcc")
    env = {"PATH": str(tmp_path / "bin"), "CUDA_HOME": str(home)}
    nvcc = probe_nvcc(FakeRunner({"nvcc": NVCC_BANNER}), env, root=tmp_path)
    assert nvcc.path == str(home / "bin" / "nvcc")
    assert nvcc.version == "12.4"


def test_nvcc_off_path_in_usr_local_cuda(tmp_path: Path) -> None:
    executable(tmp_path / "usr" / "local" / "cuda" / "bin", "nvcc")
    nvcc = probe_nvcc(FakeRunner({"nvcc": NVCC_BANNER}), {"PATH": ""}, root=tmp_path)
    assert nvcc.path == str(tmp_path / "usr" / "local" / "cuda" / "bin" / "nvcc")


def test_nvcc_on_path_beats_usr_local_cuda(tmp_path: Path) -> None:
    executable(tmp_path / "usr" / "local" / "cuda" / "bin", "nvcc")
    executable(tmp_path / "bin", "nvcc")
    nvcc = probe_nvcc(
        FakeRunner({"nvcc": NVCC_BANNER}), {"PATH": str(tmp_path / "bin")}, root=tmp_path
    )
    assert nvcc.path == str(tmp_path / "bin" / "nvcc")


def test_glslc_from_the_vulkan_sdk(tmp_path: Path) -> None:
    sdk = tmp_path / "VulkanSDK" / "1.3.280" / "x86_64"
    executable(sdk / "bin", "glslc")
    runner = banners(**{"glslc --version": "shaderc v2023.8 v2023.8\n"})
    tools = probe_toolchains(
        runner, {"PATH": "", "VULKAN_SDK": str(sdk)}, python="/x/python", root=tmp_path
    )
    assert tools["glslc"].path == str(sdk / "bin" / "glslc")
    assert tools["glslc"].version == "2023.8"
