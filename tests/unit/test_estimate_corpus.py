"""The estimate, component by component, against llama.cpp's own dry run over the CI corpus.

``estimate_oracle.json`` beside this file is what llama.cpp b11312 (CPU
build, x86-64 with AVX2) reported for every file of the CI corpus: the
buffers llama-server logged at load (``-lv 4``, 0.01 MiB) and the dry run of
``llama-fit-params --fit-print on`` (whole MiB), for every file
(``tests/corpus.py``: llama F16/Q8_0/Q4_0/Q4_K_M/IQ4_NL, qwen3, gemma3 with
sliding-window layers, a granitemoe mixture of experts, deepseek2's multi-head
latent attention) under every setting
of ``bench/memory.py``'s ``BASE`` sweep; ``python bench/memory.py
--oracle-table`` rewrites it. The corpus files are generated
here (a few MB, cached), so the estimate reads the same headers llama.cpp read.

Weights, KV cache and output buffers follow exact rules and must match to the
rounding of llama.cpp's log (0.01 MiB per buffer); the compute buffer is a
model of ggml's allocator and must never be below the server's, nor far
above it. (llama-fit-params' compute is not the server's: it reserves the
graph for n_batch outputs, the server for one per slot.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from procman.memory.estimate import MiB, estimate
from procman.models.gguf import validate_model
from tests.corpus import CI, Spec, corpus_dir, model_path
from tests.oracle import Setting

TABLE = json.loads((Path(__file__).parent / "estimate_oracle.json").read_text())
ROWS: list[dict[str, Any]] = TABLE["rows"]
#: llama.cpp logs buffer sizes in MiB with two decimals
ROUNDING = 0.01 * MiB


def _id(row: dict[str, Any]) -> str:
    return f"{row['model']}-{row['quant']}-{Setting(**row['setting']).label}"


def _estimate(row: dict[str, Any], **override: Any) -> dict[str, int]:
    setting = Setting(**row["setting"])
    info = validate_model(model_path(Spec(name=row["model"], quant=row["quant"])))
    est = estimate(info, **(setting.estimate_args() | override))
    return {k: v["host"] for k, v in est.breakdown.items()}


@pytest.fixture(scope="module", autouse=True)
def _corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The CI corpus in a scratch folder unless a corpus cache already exists."""
    with pytest.MonkeyPatch.context() as mp:
        if not corpus_dir().is_dir():
            mp.setenv("LLAMACTL_CORPUS_DIR", str(tmp_path_factory.mktemp("corpus")))
        yield


def test_the_table_covers_the_ci_corpus() -> None:
    assert {(r["model"], r["quant"]) for r in ROWS} == {(s.name, s.quant) for s in CI}
    assert len({_id(r) for r in ROWS}) == len(ROWS)
    # the corpus has the quants the CPU backend repacks and those it does not
    repacked = {r["quant"] for r in ROWS if r["server"]["buffers"].get("CPU_REPACK model")}
    assert {"Q4_0", "Q4_K_M", "IQ4_NL"} <= repacked
    assert not repacked & {"F16", "Q8_0"}


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_exact_components_match_the_server(row: dict[str, Any]) -> None:
    est, srv = _estimate(row), row["server"]
    n_model_buffers = sum(1 for k in srv["buffers"] if k.endswith(" model"))
    # with mmap the repacked matrices count twice: the mapped file pages and the repack copy
    assert est["weights"] == pytest.approx(srv["weights"], abs=n_model_buffers * ROUNDING)
    assert est["kv_cache"] == pytest.approx(srv["kv_cache"], abs=2 * ROUNDING)
    assert est["output"] == pytest.approx(srv["output"], abs=ROUNDING)


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_weights_and_kv_match_llama_fit_params(row: dict[str, Any]) -> None:
    """The dry run loads without mmap and prints whole MiB (Host and CPU_REPACK rows)."""
    est = _estimate(row, mmap=False)
    fit = row["fit"]
    assert fit["model"] <= est["weights"] < fit["model"] + 2 * MiB
    assert fit["context"] <= est["kv_cache"] < fit["context"] + MiB


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_compute_buffer_is_never_below_the_server(row: dict[str, Any]) -> None:
    est, srv = _estimate(row)["compute"], row["server"]["compute"]
    assert est >= srv - ROUNDING
    assert est <= srv * 1.25 + 2 * MiB


# -- the repack copies, the flags that move them ----------------------------------------------
def _info(name: str, quant: str) -> Any:
    return validate_model(model_path(Spec(name=name, quant=quant)))


def test_mmap_holds_repacked_weights_twice_and_no_mmap_once() -> None:
    info = _info("llama-tiny", "Q4_0")
    repacked = sum(info.layer_repack_bytes) + info.output_repack_bytes
    assert repacked > 0
    mapped = estimate(info, ctx=512).breakdown["weights"]["host"]
    plain = estimate(info, ctx=512, mmap=False).breakdown["weights"]["host"]
    assert mapped - plain == repacked
    assert estimate(info, ctx=512, repack=False).breakdown["weights"]["host"] == plain
    # F16 and Q8_0 are not repacked on x86-64: mmap changes nothing
    f16 = _info("llama-tiny", "F16")
    assert sum(f16.layer_repack_bytes) == 0
    assert estimate(f16, ctx=512).host_bytes == estimate(f16, ctx=512, mmap=False).host_bytes


def test_server_flags_that_change_the_estimate_are_read_from_extra_args() -> None:
    from procman.memory._limits import flags_from_args

    assert flags_from_args([]) == (True, 32)
    assert flags_from_args(["--load-mode", "none", "--ctx-checkpoints", "4"]) == (False, 4)
    assert flags_from_args(["-lm=mmap", "-ctxcp=0"]) == (True, 0)
    assert flags_from_args(["--load-mode", "dio"]) == (False, 32)


def test_cli_no_mmap_and_checkpoints() -> None:
    from procman.cli import _commands, _estimate  # noqa: F401
    from procman.cli._app import app

    path = str(model_path(Spec(name="gemma3-tiny", quant="Q4_0")))
    runner = CliRunner()
    mapped = runner.invoke(app, ["estimate", path, "--ctx", "2048", "--json"])
    plain = runner.invoke(app, ["estimate", path, "--ctx", "2048", "--no-mmap", "--json"])
    few = runner.invoke(
        app, ["estimate", path, "--ctx", "2048", "--ctx-checkpoints", "2", "--json"]
    )
    docs = [json.loads(r.stdout) for r in (mapped, plain, few)]
    assert docs[0]["host_bytes"] > docs[1]["host_bytes"]
    assert docs[1]["settings"]["mmap"] is False
    assert docs[0]["growth"]["checkpoints"] > 0 == docs[2]["growth"]["checkpoints"]
    assert docs[0]["breakdown"]["checkpoints"] == docs[2]["breakdown"]["checkpoints"]
