"""The estimate against real llama-server peaks and llama-fit-params, on the CI corpus.

Each case loads a synthetic model of a real architecture (``tests/corpus.py``,
a few MB) in the real compiled server, fills every slot with a prompt as long
as the slot, and reads the peak RSS: the estimate must be within the one-sided
bound (never below by more than max(1 %, 16 MiB), never above by more than
max(5 %, 128 MiB)), and each exact component must match the buffer the server
logged and llama.cpp's own dry run (``llama-fit-params --fit-print on``).
"""

from __future__ import annotations

import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from buildtools import BuildResult
from procman.memory.estimate import MiB, estimate
from procman.models.gguf import validate_model
from tests.corpus import Spec, corpus_dir, model_path
from tests.integration.conftest import Processes
from tests.oracle import Setting, buffers, fill_slots, fit_print, peak_rss, within

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

CASES = [
    # repacked weights held twice (mapped + CPU_REPACK), four slots
    (Spec(name="llama-tiny", quant="Q4_0"), Setting(ctx=2048, parallel=4)),
    # sliding-window layers, eight streams, no flash attention (KQ in the compute buffer)
    (Spec(name="gemma3-tiny", quant="Q4_0"), Setting(ctx=4096, parallel=8, flash_attn=False)),
    # mixture of experts without mmap: the repack buffer replaces the plain one
    (Spec(name="moe-tiny", quant="Q4_K_M"), Setting(ctx=2048, mmap=False)),
    # a quantised KV cache
    (Spec(name="qwen3-tiny", quant="Q8_0"), Setting(ctx=4096, cache_type="q8_0")),
    # multi-head latent attention (deepseek2): one compressed K row a cell, no V
    (Spec(name="mla-tiny", quant="Q8_0"), Setting(ctx=2048, parallel=4)),
]


@pytest.fixture(scope="module", autouse=True)
def _corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        if not corpus_dir().is_dir():
            mp.setenv("LLAMACTL_CORPUS_DIR", str(tmp_path_factory.mktemp("corpus")))
        yield


def _serve(
    processes: Processes, binary: Path, model: Path, setting: Setting
) -> tuple[int, str, list[str]]:
    """Start llama-server; once it says it is listening: its pid, base URL and log so far."""
    from procman import pick_free_port

    port = pick_free_port()
    argv = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port)]
    proc = processes.popen(
        [*argv, *setting.server_args()], stdout=-1, stderr=-2, text=True, errors="replace"
    )
    lines: list[str] = []
    listening = threading.Event()

    def drain() -> None:  # keeps the pipe empty and notices the readiness line
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "listening on http" in line:
                listening.set()
        listening.set()  # exited: the assertion below says so

    threading.Thread(target=drain, daemon=True).start()
    assert listening.wait(120), "llama-server did not start listening"
    assert proc.poll() is None, "llama-server exited:\n" + "".join(lines[-20:])
    url = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(f"{url}/health", timeout=30) as resp:  # noqa: S310 - local
        assert resp.status == 200
    return proc.pid, url, lines


@pytest.mark.parametrize(
    ("spec", "setting"), CASES, ids=[f"{c[0].label}-{c[1].label}" for c in CASES]
)
def test_estimate_is_one_sided_and_each_component_located(
    default_build: BuildResult, processes: Processes, spec: Spec, setting: Setting
) -> None:
    model = model_path(spec)
    info = validate_model(model)
    est = estimate(info, **setting.estimate_args())
    fit = fit_print(default_build.build.fit_params, model, setting)

    pid, url, log = _serve(processes, default_build.build.binary, model, setting)
    # every slot evaluated a prompt filling it (all but the 8 cells kept for the answer)
    per_slot = min(setting.ctx // setting.parallel, info.n_ctx_train) - 8
    assert fill_slots(url, setting, n_ctx_train=info.n_ctx_train) == setting.parallel * per_slot
    peak = peak_rss(pid)
    server = buffers("".join(log))

    host = est.breakdown
    assert within(est.host_bytes, peak), (
        f"estimate {est.host_bytes / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB"
    )
    # exact rules, to the 0.01 MiB of llama.cpp's log
    n_weight_buffers = sum(1 for k in server["buffers"] if k.endswith(" model"))
    assert host["weights"]["host"] == pytest.approx(
        server["weights"], abs=n_weight_buffers * MiB / 100
    )
    assert host["kv_cache"]["host"] == pytest.approx(server["kv_cache"], abs=2 * MiB / 100)
    assert host["output"]["host"] == pytest.approx(server["output"], abs=MiB / 100)
    assert host["compute"]["host"] >= server["compute"] - MiB / 100
    # llama.cpp's dry run loads without mmap and prints whole MiB
    plain = estimate(info, **(setting.estimate_args() | {"mmap": False})).breakdown
    assert fit["model"] <= plain["weights"]["host"] < fit["model"] + 2 * MiB
    assert fit["context"] <= plain["kv_cache"]["host"] < fit["context"] + MiB
