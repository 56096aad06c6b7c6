"""GPU placement for real: ``devices = "auto"`` and ``[0]`` on the machine's first GPU.

Needs an NVIDIA GPU and a CUDA toolkit, like test_cuda.py (whose build, model
and GPU checks it shares); skipped elsewhere with the reason. One GPU is
enough: both settings must place the server on GPU 0, the server must see only
that card (``CUDA_VISIBLE_DEVICES`` by UUID in its environment, read from
``/proc``), and VRAM must be metered on that card (``llamactl ps``, ``/metrics``).
Run on the lent GPU machine by ``tests/device/cuda_checks.sh``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from buildtools import BuildResult
from buildtools.hardware import HardwareProfile
from tests.integration.test_cuda import (  # the shared GPU fixtures and skip
    CLI,
    cuda_build,
    free_port,
    model,
    profile,
    pytestmark,
)

__all__ = ["cuda_build", "model", "profile", "pytestmark"]  # fixtures pytest finds by name

CONFIG = """
[models.auto]
path = "{model}"
ctx = 2048
gpu_layers = "all"
devices = "auto"

[models.pinned]
path = "{model}"
ctx = 2048
gpu_layers = "all"
devices = [0]
"""


def _post(base: str, name: str) -> dict[str, Any]:
    body = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    request = urllib.request.Request(  # noqa: S310 - loopback URL
        f"{base}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as resp:  # noqa: S310 - loopback
        answer: dict[str, Any] = json.load(resp)
    return answer


@pytest.fixture
def served(cuda_build: BuildResult, model: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    config = tmp_path / "models.toml"
    config.write_text(CONFIG.format(model=model))
    port = free_port()
    env = {**os.environ, "LLAMACTL_HOME": str(tmp_path / "home"), "COLUMNS": "300"}
    proc = subprocess.Popen(
        [*CLI, "serve", "--config", str(config), "--port", str(port),
         "--server", str(cuda_build.build.binary)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}", tmp_path / "home"
    finally:
        proc.terminate()
        print(f"\n--- serve --config\n{proc.communicate(timeout=60)[0]}")


def _row(base: str, home: Path, name: str) -> dict[str, Any]:
    """``llamactl ps --json``'s row for ``name`` once its GPU's VRAM has been sampled."""
    env = {**os.environ, "LLAMACTL_HOME": str(home), "LLAMACTL_URL": base}
    deadline = time.monotonic() + 60
    while True:  # the meter samples every few seconds; ps asks the router each time
        done = subprocess.run(
            [*CLI, "ps", "--json"], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        row = next(r for r in json.loads(done.stdout) if r["name"] == name)
        devices = row.get("devices") or []
        if devices and devices[0]["vram_bytes"]:
            return row
        assert time.monotonic() < deadline, row
        time.sleep(0.5)


@pytest.mark.parametrize("name", ["auto", "pinned"])
def test_the_model_is_placed_on_gpu_0_and_sees_only_it(
    served: tuple[str, Path], profile: HardwareProfile, name: str
) -> None:
    base, home = served
    deadline = time.monotonic() + 180
    while True:  # serve --config loads on demand: the first request starts the server
        try:
            answer = _post(base, name)
            break
        except OSError:
            assert time.monotonic() < deadline, "no answer after 180 s"
            time.sleep(0.5)
    assert answer["usage"]["completion_tokens"] > 0
    gpu0 = profile.gpus[0]
    row = _row(base, home, name)
    print(f"\n{name}: ps devices {row['devices']}, vram_bytes {row['vram_bytes']}")
    (device,) = row["devices"]
    assert device["index"] == 0 and device["uuid"] == gpu0.uuid, row
    assert device["vram_bytes"] > 0 and device["reserved_bytes"] > 0
    assert row["vram_bytes"] == device["vram_bytes"]  # nothing on any other card
    environ = Path(f"/proc/{row['pid']}/environ").read_bytes().split(b"\0")
    assert f"CUDA_VISIBLE_DEVICES={gpu0.uuid}".encode() in environ
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as resp:  # noqa: S310
        metrics = resp.read().decode()
    line = f'llamactl_server_device_vram_bytes{{gpu="0",server="{name}",uuid="{gpu0.uuid}"}}'
    assert line in metrics, metrics
    log = next(home.rglob(f"{name}*.log")).read_text(errors="replace")
    assert f"CUDA_VISIBLE_DEVICES={gpu0.uuid} " in log
    print(
        f"{name}: NVML {device['vram_bytes']:,} B on GPU 0, reserved {device['reserved_bytes']:,} B"
    )
