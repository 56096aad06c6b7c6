"""estimate() against llama.cpp b11312's sizing rules and its own measured buffer sizes.

The ``MEASURED_*`` tables are the ``KV buffer size`` / ``compute buffer size``
lines llama-server (CPU build, b11312) printed for SmolLM2-135M-Instruct
Q4_1 and for a random-weight gemma3-shaped model with a 128-token window.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from procman.errors import ConfigError, ModelError
from procman.memory.estimate import COMPONENTS, Estimate, MiB, estimate
from procman.models.gguf import ModelInfo, validate_model
from tests.unit.test_model_file import write_model

SMOLLM2 = ModelInfo(
    path=Path("SmolLM2-135M-Instruct.Q4_1.gguf"),
    size_bytes=98_362_432,
    gguf_version=3,
    architecture="llama",
    name="SmolLM2",
    file_type="Q4_1",
    n_layers=30,
    n_ctx_train=8192,
    n_embd=576,
    n_ff=1536,
    n_head=9,
    n_head_kv=3,
    layer_n_head_kv=(3,) * 30,
    head_dim_k=64,
    head_dim_v=64,
    head_dim_k_swa=64,
    head_dim_v_swa=64,
    sliding_window=0,
    swa_layers=(False,) * 30,
    n_vocab=49152,
    n_expert=0,
    n_expert_used=0,
    n_ff_expert=0,
    mla=False,
    tensor_count=272,
    tensor_bytes=96_576_768,
    layer_tensor_bytes=(2_216_448,) * 30,
    input_tensor_bytes=30_081_024,
    output_tensor_bytes=2304,
    tied_embeddings=True,
    header_bytes=1_785_664,
)

GEMMA3_TINY = dataclasses.replace(
    SMOLLM2,
    architecture="gemma3",
    n_layers=12,
    n_ctx_train=4096,
    n_embd=384,
    n_ff=1024,
    n_head=6,
    n_head_kv=2,
    layer_n_head_kv=(2,) * 12,
    sliding_window=128,
    swa_layers=tuple(il % 6 < 5 for il in range(12)),
    layer_tensor_bytes=(100_000,) * 12,
)

# (ctx, -np, -ub, flash attention) -> (KV MiB, compute MiB) as llama-server logged them
MEASURED_SMOLLM2 = {
    (512, 1, 512, None): (11.25, 14.01),
    (512, 4, 512, None): (22.50, 13.76),
    (2048, 1, 512, None): (45.00, 15.51),
    (2048, 4, 512, None): (45.00, 14.01),
    (8192, 1, 512, None): (180.00, 21.51),
    (8192, 4, 512, None): (180.00, 15.51),
    (2048, 1, 64, None): (45.00, 1.94),
    (2048, 1, 1024, None): (45.00, 31.02),
    (2048, 1, 2048, None): (45.00, 62.05),
    (512, 1, 512, False): (11.25, 16.38),
    (8192, 1, 512, False): (180.00, 166.38),
    (8192, 4, 512, False): (180.00, 46.38),
}
MEASURED_GEMMA3 = {
    (512, 1, 512, None): (0.50 + 2.50, 10.02),
    (512, 4, 512, None): (1.00 + 5.00, 9.52),
    (4096, 1, 512, None): (4.00 + 3.75, 13.77),
    (4096, 4, 512, None): (4.00 + 15.00, 10.77),
    (4096, 1, 512, False): (4.00 + 3.75, 62.26),
}


def mib(n: int) -> float:
    return n / MiB


@pytest.mark.parametrize(
    ("info", "case", "measured"),
    [(SMOLLM2, k, v) for k, v in MEASURED_SMOLLM2.items()]
    + [(GEMMA3_TINY, k, v) for k, v in MEASURED_GEMMA3.items()],
)
def test_matches_llama_server_buffer_sizes(
    info: ModelInfo, case: tuple[int, int, int, bool | None], measured: tuple[float, float]
) -> None:
    ctx, parallel, ubatch, fa = case
    est = estimate(info, ctx=ctx, parallel=parallel, n_ubatch=ubatch, flash_attn=fa)
    kv, compute = measured
    assert mib(est.breakdown["kv_cache"]["host"]) == pytest.approx(kv, abs=0.01)
    # one-sided: never below the server's buffer, at most the slack above it
    assert compute - 0.01 <= mib(est.breakdown["compute"]["host"]) <= compute * 1.10 + 0.01


def test_smollm2_weights_and_output_buffer() -> None:
    est = estimate(SMOLLM2, ctx=2048, parallel=4)
    assert mib(est.breakdown["weights"]["host"]) == pytest.approx(92.10, abs=0.01)
    assert mib(est.breakdown["output"]["host"]) == pytest.approx(0.75, abs=0.01)
    assert est.device_bytes == 0


@pytest.mark.parametrize(
    ("ctx", "parallel", "measured_peak_rss"),
    [
        (512, 1, 157_118_464),
        (512, 4, 164_790_272),
        (2048, 1, 197_451_776),
        (2048, 4, 198_758_400),
        (8192, 1, 347_979_776),
        (8192, 4, 343_875_584),
    ],
)
def test_host_total_within_ten_percent_of_measured_peak_rss(
    ctx: int, parallel: int, measured_peak_rss: int
) -> None:
    est = estimate(SMOLLM2, ctx=ctx, parallel=parallel)
    assert est.host_bytes == pytest.approx(measured_peak_rss, rel=0.10)


# -- context layout ---------------------------------------------------------------------------


def test_context_is_padded_to_256_and_zero_means_training_context() -> None:
    assert estimate(SMOLLM2, ctx=1000).settings["n_ctx"] == 1024
    assert estimate(SMOLLM2, ctx=0).settings["n_ctx"] == 8192


def test_slots_split_the_context_unless_unified() -> None:
    split = estimate(SMOLLM2, ctx=512, parallel=4)
    assert (split.settings["n_ctx_seq"], split.settings["n_ctx"]) == (256, 1024)
    assert split.settings["n_stream"] == 4
    unified = estimate(SMOLLM2, ctx=512, parallel=4, kv_unified=True)
    assert (unified.settings["n_ctx_seq"], unified.settings["n_stream"]) == (512, 1)
    assert (
        unified.breakdown["kv_cache"]["host"]
        == estimate(SMOLLM2, ctx=512).breakdown["kv_cache"]["host"]
    )


def test_grouped_query_attention_scales_the_cache_by_kv_heads() -> None:
    full_mha = dataclasses.replace(SMOLLM2, n_head_kv=9, layer_n_head_kv=(9,) * 30)
    gqa = estimate(SMOLLM2, ctx=2048).breakdown["kv_cache"]["host"]
    mha = estimate(full_mha, ctx=2048).breakdown["kv_cache"]["host"]
    assert mha == 3 * gqa
    # per cell: 30 layers x (K + V) x 3 heads x 64 dims x 2 bytes
    assert gqa == 2048 * 30 * 2 * 3 * 64 * 2


def test_layers_without_kv_heads_hold_no_cache() -> None:
    info = dataclasses.replace(SMOLLM2, layer_n_head_kv=(3, 0) * 15)
    half = estimate(info, ctx=512).breakdown["kv_cache"]["host"]
    assert half * 2 == estimate(SMOLLM2, ctx=512).breakdown["kv_cache"]["host"]


@pytest.mark.parametrize(
    ("cache_type", "measured_mib"), [("f16", 180.0), ("q8_0", 95.62), ("q4_0", 50.62)]
)
def test_quantised_cache_types_use_their_block_sizes(cache_type: str, measured_mib: float) -> None:
    est = estimate(SMOLLM2, ctx=8192, cache_type_k=cache_type, cache_type_v=cache_type)
    assert mib(est.breakdown["kv_cache"]["host"]) == pytest.approx(measured_mib, abs=0.01)


def test_sliding_window_layers_keep_window_plus_ubatch_cells() -> None:
    est = estimate(GEMMA3_TINY, ctx=4096)
    assert est.settings["kv_cells"] == 4096
    assert est.settings["kv_cells_swa"] == 768  # pad256(min(4096, 128 + 512))
    split = estimate(GEMMA3_TINY, ctx=4096, parallel=4)
    assert split.settings["kv_cells_swa"] == 4 * 768  # one window per stream
    unified = estimate(GEMMA3_TINY, ctx=4096, parallel=4, kv_unified=True)
    assert unified.settings["kv_cells_swa"] == 1024  # pad256(128 x 4 seqs + 512)
    full = estimate(GEMMA3_TINY, ctx=4096, swa_full=True)
    assert full.settings["kv_cells_swa"] == 4096


def test_checkpoints_and_prompt_cache_are_growth_not_start_up() -> None:
    est = estimate(GEMMA3_TINY, ctx=4096, parallel=2, cache_ram=64 * MiB)
    assert est.growth["prompt_cache"] == 64 * MiB
    # a checkpoint: (128 + 512) cells x 10 SWA layers x 512 bytes; the first prompt of
    # each slot makes two (held from the start), later prompts up to 32 a slot
    checkpoint = 640 * 10 * 512
    assert est.breakdown["checkpoints"]["host"] == 2 * 2 * checkpoint
    assert est.growth["checkpoints"] == 2 * 30 * checkpoint
    assert estimate(GEMMA3_TINY, ctx=4096, ctx_checkpoints=0).breakdown["checkpoints"] == {
        "host": 0,
        "device": 0,
    }
    assert est.host_growth_bytes == sum(est.growth.values())
    assert estimate(SMOLLM2, ctx=4096).host_growth_bytes == 0
    assert est.host_bytes == sum(part["host"] for part in est.breakdown.values())


# -- offload ----------------------------------------------------------------------------------


def test_cpu_only_puts_nothing_on_the_device() -> None:
    est = estimate(SMOLLM2, ctx=2048)
    assert est.device_bytes == 0
    assert all(part["device"] == 0 for part in est.breakdown.values())


def test_one_gpu_layer_is_the_output_layer() -> None:
    est = estimate(SMOLLM2, ctx=2048, gpu_layers=1)
    weights = est.breakdown["weights"]
    # llama.cpp b11312 offloads the output layer first; the tied head copies token_embd
    assert weights["device"] == SMOLLM2.output_tensor_bytes + SMOLLM2.input_tensor_bytes
    assert weights["host"] == SMOLLM2.input_tensor_bytes + sum(SMOLLM2.layer_tensor_bytes)
    assert est.breakdown["kv_cache"]["device"] == 0
    assert est.settings["output_on_device"]


def test_gpu_layers_offload_the_last_layers_with_their_cache() -> None:
    est = estimate(SMOLLM2, ctx=2048, gpu_layers=11)
    per_layer_kv = 2048 * 2 * 3 * 64 * 2
    assert est.breakdown["kv_cache"]["device"] == 10 * per_layer_kv
    assert est.breakdown["kv_cache"]["host"] == 20 * per_layer_kv
    assert est.breakdown["compute"]["host"] == est.breakdown["compute"]["device"]


@pytest.mark.parametrize("ngl", [-1, 31, 99])
def test_all_layers_offloaded(ngl: int) -> None:
    est = estimate(SMOLLM2, ctx=2048, gpu_layers=ngl)
    assert est.settings["gpu_layers"] == 31
    assert est.breakdown["kv_cache"]["host"] == 0
    assert est.breakdown["weights"]["host"] == SMOLLM2.input_tensor_bytes
    assert est.breakdown["compute"]["host"] < est.breakdown["compute"]["device"]
    assert est.breakdown["overhead"]["device"] > 0


# -- refusals and output ----------------------------------------------------------------------


def test_unknown_cache_type_suggests_the_closest() -> None:
    with pytest.raises(ConfigError) as exc_info:
        estimate(SMOLLM2, ctx=512, cache_type_k="q8")
    assert exc_info.value.hint == "did you mean q8_0?"


def test_quantised_v_cache_needs_flash_attention() -> None:
    with pytest.raises(ConfigError, match="flash attention"):
        estimate(SMOLLM2, ctx=512, cache_type_v="q4_0", flash_attn=False)


def test_block_size_must_divide_the_kv_row() -> None:
    odd = dataclasses.replace(SMOLLM2, head_dim_k=40, head_dim_k_swa=40, n_head_kv=1)
    odd = dataclasses.replace(odd, layer_n_head_kv=(1,) * 30)
    with pytest.raises(ConfigError, match="32 values per block"):
        estimate(odd, ctx=512, cache_type_k="q8_0")


@pytest.mark.parametrize(("kwargs"), [{"parallel": 0}, {"parallel": 257}, {"ctx": -1}])
def test_bad_numbers(kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        estimate(SMOLLM2, **kwargs)


def test_to_json_is_json_ready() -> None:
    est = estimate(GEMMA3_TINY, ctx=1024, gpu_layers=3)
    doc = json.loads(json.dumps(est.to_json()))
    assert doc["host_bytes"] == est.host_bytes
    assert doc["device_bytes"] == est.device_bytes
    assert list(doc["breakdown"]) == list(COMPONENTS)
    assert doc["breakdown"]["weights"] == est.breakdown["weights"]
    assert doc["settings"]["n_ctx"] == 1024
    assert isinstance(est, Estimate)


def test_estimate_from_a_synthetic_file(tmp_path: Path) -> None:
    info = validate_model(write_model(tmp_path / "m.gguf", n_head=8, n_head_kv=2))
    est = estimate(info, ctx=256)
    assert est.breakdown["kv_cache"]["host"] == 256 * 2 * (2 * 2 * 8 * 2)
    assert est.breakdown["weights"]["host"] == info.tensor_bytes


# -- the CLI command --------------------------------------------------------------------------


def invoke(*args: str) -> tuple[int, str, BaseException | None]:
    # with a single registered command typer would make it the root command, so
    # load them all, as the real entry point does
    from procman.cli import _commands, _estimate  # noqa: F401
    from procman.cli._app import app

    result = CliRunner().invoke(app, ["estimate", *args])
    return result.exit_code, result.stdout, result.exception


def test_cli_json(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf")
    code, stdout, exc = invoke(str(path), "--ctx", "512", "--parallel", "2", "--json")
    assert (code, exc) == (0, None)
    doc = json.loads(stdout)
    assert {"host_bytes", "device_bytes", "breakdown"} <= set(doc)
    assert doc["model"]["architecture"] == "llama"
    assert doc["settings"]["parallel"] == 2


def test_cli_table(tmp_path: Path) -> None:
    code, stdout, _ = invoke(str(write_model(tmp_path / "m.gguf")), "--gpu-layers", "-1")
    assert code == 0
    for word in ("weights", "kv cache", "compute", "total", "tiny llama"):
        assert word in stdout


def test_cli_demo_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import buildtools.demo

    path = write_model(tmp_path / "demo.gguf")
    monkeypatch.setattr(buildtools.demo, "demo_model_path", lambda: path)
    code, stdout, _ = invoke("demo", "--json")
    assert code == 0
    assert json.loads(stdout)["model"]["path"] == str(path.resolve())


def test_cli_model_errors_propagate(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model\n")
    code, _, exc = invoke(str(tmp_path / "notes.txt"))
    assert code != 0
    assert isinstance(exc, ModelError)


def test_no_parallel_means_llama_servers_auto_slots() -> None:
    est = estimate(SMOLLM2, ctx=8192, parallel=None)
    assert (est.settings["parallel"], est.settings["kv_unified"]) == (4, True)
    # measured: -c 8192 without -np gave 180 MiB KV, 21.51 MiB compute, 0.75 MiB output
    assert mib(est.breakdown["kv_cache"]["host"]) == pytest.approx(180.0, abs=0.01)
    assert 21.51 <= mib(est.breakdown["compute"]["host"]) <= 21.51 * 1.10
    assert mib(est.breakdown["output"]["host"]) == pytest.approx(0.75, abs=0.01)
