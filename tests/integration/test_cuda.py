"""The CUDA path for real: NVML detection, the CUDA build, layer offload, VRAM metering.

These need an NVIDIA GPU and a CUDA toolkit (nvcc). The CI and development
machines have neither, so every test here is skipped there and the summary
says why; `tests/device/cuda_checks.sh` runs them on the GPU machine the
device tool lends. They build with the default plan (what `llamactl build`
does on that machine) and run `llamactl serve` and `llamactl ps` as a user
would. The model is the demo model, or ``$LLAMACTL_TEST_MODEL`` where the
demo cannot be fetched (the GPU machine is offline).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import buildtools
from buildtools import BuildOptions, BuildResult, make_plan
from buildtools.hardware import Backend, HardwareProfile, detect
from buildtools.verify import gpu_offload
from procman.memory.estimate import estimate
from procman.models.gguf import validate_model

CLI = [sys.executable, "-m", "procman.cli"]


def _missing() -> str | None:
    profile = detect()
    if not profile.gpus:
        return "no NVIDIA GPU here (NVML reports none)"
    if not profile.tool("nvcc").found:
        return "no CUDA toolkit here (nvcc not found)"
    return None


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif((why := _missing()) is not None, reason=why or ""),
]


@pytest.fixture(scope="module")
def profile() -> HardwareProfile:
    return detect()


@pytest.fixture(scope="module")
def model() -> Path:
    if given := os.environ.get("LLAMACTL_TEST_MODEL"):
        return Path(given)
    from buildtools.demo import demo_model_path

    return demo_model_path()


@pytest.fixture(scope="module")
def cuda_build(profile: HardwareProfile, model: Path) -> BuildResult:
    result = buildtools.build(profile, BuildOptions(), buildtools.provision(), model=model)
    print(f"\nCUDA build: {json.dumps(result.to_json(), indent=1)}")
    return result


def test_nvml_sees_the_gpu_and_the_plan_targets_it(profile: HardwareProfile) -> None:
    gpu = profile.gpus[0]
    print(f"\n{gpu}")
    assert gpu.vendor == "nvidia" and gpu.memory_bytes and gpu.memory_bytes > 1 << 30
    assert gpu.compute_capability and re.fullmatch(r"\d+\.\d+", gpu.compute_capability)
    assert profile.backend_available(Backend.CUDA), profile.backends[Backend.CUDA].reason
    plan = make_plan(profile, BuildOptions())
    assert plan.cmake_defines["GGML_CUDA"] == "ON", plan.reasons
    arch = gpu.compute_capability.replace(".", "")
    assert plan.cmake_defines["CMAKE_CUDA_ARCHITECTURES"] == f"{arch}-real"


def test_the_cuda_build_is_verified_on_the_gpu(cuda_build: BuildResult) -> None:
    assert cuda_build.build.backend == "cuda", cuda_build.to_json()
    offloaded = cuda_build.build.manifest["verified"]["gpu_layers"]
    done, total = (int(n) for n in offloaded.split("/"))
    assert 0 < done == total, offloaded  # verification offloads every layer
    listed = subprocess.run(
        [str(cuda_build.build.binary), "--list-devices"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    print(listed.stdout + listed.stderr)
    assert "CUDA0" in listed.stdout + listed.stderr


# -- serve ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _chat(base: str) -> dict[str, Any]:
    body = {"model": "gpu", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}
    request = urllib.request.Request(  # noqa: S310 - loopback URL
        f"{base}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as resp:  # noqa: S310 - loopback
        answer: dict[str, Any] = json.load(resp)
    return answer


@pytest.fixture
def serve(cuda_build: BuildResult, model: Path, tmp_path: Path) -> Iterator[Any]:
    started: list[subprocess.Popen[str]] = []
    env = {**os.environ, "LLAMACTL_HOME": str(tmp_path / "home"), "COLUMNS": "300"}

    def run(gpu_layers: str) -> tuple[str, dict[str, Any]]:
        port = free_port()
        proc = subprocess.Popen(
            [*CLI, "serve", str(model), "--port", str(port), "--name", "gpu", "--ctx", "2048",
             "--server", str(cuda_build.build.binary), "--gpu-layers", gpu_layers,
             "--", "-lv", "4"],  # llama-server logs the offload at verbosity 4
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        started.append(proc)
        base = f"http://127.0.0.1:{port}"
        answer = None
        deadline = time.monotonic() + 120
        while answer is None:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "not answering after 120 s"
            try:
                answer = _chat(base)
            except OSError:
                time.sleep(0.2)
        assert answer["usage"]["completion_tokens"] > 0
        ctl_env = {**env, "LLAMACTL_URL": base}
        row: dict[str, Any] = {}
        while row.get("vram_bytes") is None:  # the meter samples every 5 s
            assert time.monotonic() < deadline + 30, row
            done = subprocess.run(
                [*CLI, "ps", "--json"],
                env=ctl_env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            row = json.loads(done.stdout)[0]
            time.sleep(0.5)
        log = next((tmp_path / "home").rglob("gpu*.log")).read_text(errors="replace")
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
        print(f"\n--- serve --gpu-layers {gpu_layers}\n{out}\nps: {row}")
        return log, row

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_offloads_and_meters_the_vram_it_takes(serve: Any, model: Path) -> None:
    info = validate_model(model)
    full_log, full = serve("all")
    assert gpu_offload(full_log) == (info.n_layers + 1, info.n_layers + 1)
    two_log, two = serve("2")
    assert gpu_offload(two_log) == (2, info.n_layers + 1)
    assert full["vram_bytes"] > two["vram_bytes"] > 0, (full, two)
    predicted = estimate(info, ctx=2048, gpu_layers=-1).device_bytes
    print(f"VRAM all layers: NVML {full['vram_bytes']:,} B, estimate {predicted:,} B")
    print(f"VRAM 2 layers: NVML {two['vram_bytes']:,} B")
    # the estimate sizes admission and `auto`; it must be the right order of magnitude
    assert 0.5 < full["vram_bytes"] / predicted < 2.0, (full["vram_bytes"], predicted)


def test_auto_offloads_every_layer_that_fits(serve: Any, model: Path) -> None:
    info = validate_model(model)
    log, row = serve("auto")
    assert gpu_offload(log) == (info.n_layers + 1, info.n_layers + 1), row
