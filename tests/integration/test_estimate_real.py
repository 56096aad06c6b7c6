"""The estimate against the real demo model and the real compiled llama-server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from procman.memory.estimate import estimate
from procman.models.gguf import validate_model


def test_demo_model_metadata(demo_model: Path) -> None:
    info = validate_model(demo_model)
    assert info.size_bytes == 98_362_432
    assert (info.architecture, info.file_type) == ("llama", "Q4_1")
    assert (info.n_layers, info.n_ctx_train, info.n_embd, info.n_ff) == (30, 8192, 576, 1536)
    assert (info.n_head, info.n_head_kv, info.head_dim) == (9, 3, 64)
    assert info.gqa
    assert info.n_vocab == 49152
    assert info.sliding_window == 0
    assert info.tied_embeddings
    # llama-server logs "CPU_Mapped model buffer size = 92.10 MiB" for this file
    assert info.tensor_bytes == 96_576_768


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def _get(url: str, body: dict[str, object] | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(url, data=data, headers=headers)  # noqa: S310 - local server
    with urllib.request.urlopen(req, timeout=120) as resp:  # noqa: S310 - local server
        resp.read()
        return int(resp.status)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(("ctx", "parallel"), [(2048, 1), (2048, 4)])
def test_host_estimate_within_ten_percent_of_peak_rss(
    llama_server: Path, demo_model: Path, ctx: int, parallel: int
) -> None:
    from procman import pick_free_port

    port = pick_free_port()
    argv = [str(llama_server), "-m", str(demo_model), "--port", str(port)]
    argv += ["-c", str(ctx), "-np", str(parallel), "--log-disable"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "llama-server exited during start-up"
            try:
                if _get(f"http://127.0.0.1:{port}/health") == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "llama-server did not become ready"
            time.sleep(0.1)
        # a prompt near the slot's size touches (nearly) all of the compute buffer
        body = {"prompt": " hello" * (ctx // parallel - 64), "n_predict": 2}
        assert _get(f"http://127.0.0.1:{port}/completion", body) == 200
        measured = _peak_rss(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    predicted = estimate(validate_model(demo_model), ctx=ctx, parallel=parallel).host_bytes
    assert predicted == pytest.approx(measured, rel=0.10)
