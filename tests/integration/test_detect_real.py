"""``detect()`` and ``llamactl detect --json`` on the real machine.

The assertions are facts of the project's machines (x86_64 with AVX2, an
nvcc on PATH but no NVIDIA driver); a machine that differs skips rather
than fails where the fact is the machine's, not the code's.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from buildtools.hardware import Backend, detect

ROOT = Path(__file__).resolve().parents[2]
ALL_BACKENDS = {"cpu", "cuda", "metal", "opencl", "vulkan"}

needs_x86 = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="facts of the x86_64 dev machines"
)


@needs_x86
def test_detect_sees_this_machine() -> None:
    profile = detect()
    assert profile.os == "linux"
    assert profile.cpu.arch == "x86_64"
    assert profile.cpu.has("avx2")
    assert {"sse4_2", "avx", "fma", "f16c"} <= set(profile.cpu.features)
    assert not any("XCR0 could not be read" in n for n in profile.cpu.notes)
    assert {str(b) for b in profile.backends} == ALL_BACKENDS
    assert profile.backend_available(Backend.CPU), profile.backends[Backend.CPU].reason
    assert not profile.backend_available(Backend.METAL)
    cmake = profile.tool("cmake")
    assert cmake.found
    assert cmake.version


@needs_x86
def test_cuda_is_unavailable_without_a_driver() -> None:
    profile = detect()
    if profile.gpus:
        pytest.skip("this machine has a GPU")
    cuda = profile.backends[Backend.CUDA]
    assert not cuda.available
    assert "NVML" in cuda.reason or "NVIDIA" in cuda.reason


def test_cli_detect_json() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "procman.cli", "detect", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc["backends"]) == ALL_BACKENDS
    assert all(set(s) == {"available", "reason"} for s in doc["backends"].values())
    assert {"arch", "model", "features", "advertised_only"} <= set(doc["cpu"])
    assert {"cmake", "ninja", "cc", "cxx", "nvcc", "ccache"} <= set(doc["toolchains"])
    assert all({"path", "version"} <= set(t) for t in doc["toolchains"].values())
    assert doc["backends"]["cpu"]["available"] is True
    assert doc["cpu"]["arch"] == platform.machine().lower()
