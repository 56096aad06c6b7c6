"""choose_gpu_layers against fake free-VRAM figures (an 80 GiB H100, a 4 GiB card)."""

from __future__ import annotations

import dataclasses

import pytest

from procman.errors import ConfigError
from procman.memory.estimate import MiB, estimate
from procman.memory.gpu_layers import DEFAULT_MARGIN, choose_gpu_layers
from tests.unit.test_estimate import SMOLLM2

GiB = 1024 * MiB
H100_FREE = 79 * GiB  # an idle 80 GiB H100: the driver keeps ~0.5-1 GiB
SMALL_CARD_FREE = 4 * GiB - 300 * MiB  # a 4 GiB card with a desktop on it

#: a Llama-3-8B Q4_K_M shape: 32 layers of ~131 MB, 128k vocabulary, 4.9 GB in all
LLAMA8B = dataclasses.replace(
    SMOLLM2,
    n_layers=32,
    n_ctx_train=8192,
    n_embd=4096,
    n_ff=14336,
    n_head=32,
    n_head_kv=8,
    layer_n_head_kv=(8,) * 32,
    head_dim_k=128,
    head_dim_v=128,
    head_dim_k_swa=128,
    head_dim_v_swa=128,
    swa_layers=(False,) * 32,
    n_vocab=128256,
    layer_tensor_bytes=(131_000_000,) * 32,
    input_tensor_bytes=294_000_000,
    output_tensor_bytes=431_000_000,
    tied_embeddings=False,
)
#: a Llama-3-70B Q4_K_M shape: 80 layers of ~520 MB
LLAMA70B = dataclasses.replace(
    LLAMA8B,
    n_layers=80,
    n_embd=8192,
    n_ff=28672,
    n_head=64,
    layer_n_head_kv=(8,) * 80,
    swa_layers=(False,) * 80,
    layer_tensor_bytes=(520_000_000,) * 80,
    input_tensor_bytes=580_000_000,
    output_tensor_bytes=860_000_000,
    n_ctx_train=131072,
)


def device(info: object, ngl: int, ctx: int) -> int:
    assert isinstance(info, type(SMOLLM2))
    return estimate(info, ctx=ctx, gpu_layers=ngl).device_bytes


def test_auto_on_an_h100_offloads_a_70b_model_entirely() -> None:
    layers, reason = choose_gpu_layers("auto", LLAMA70B, free_vram_bytes=H100_FREE, ctx=8192)
    assert layers == 81
    assert reason.startswith("auto: 81/81 layers (all layers fit)")


def test_auto_stops_where_the_long_context_cache_no_longer_fits() -> None:
    # 128k context: 40 GiB of KV cache on top of 42 GB of weights
    layers, reason = choose_gpu_layers("auto", LLAMA70B, free_vram_bytes=H100_FREE, ctx=131072)
    usable = H100_FREE - DEFAULT_MARGIN
    assert 0 < layers < 81
    assert device(LLAMA70B, layers, 131072) <= usable < device(LLAMA70B, layers + 1, 131072)
    assert "what fits" in reason


def test_auto_on_a_4_gib_card_offloads_part_of_an_8b_model() -> None:
    layers, reason = choose_gpu_layers("auto", LLAMA8B, free_vram_bytes=SMALL_CARD_FREE, ctx=4096)
    usable = SMALL_CARD_FREE - DEFAULT_MARGIN
    assert 10 < layers < 33
    assert device(LLAMA8B, layers, 4096) <= usable < device(LLAMA8B, layers + 1, 4096)
    assert f"auto: {layers}/33 layers" in reason and "512 MiB kept free" in reason


def test_auto_respects_the_configured_cap() -> None:
    layers, reason = choose_gpu_layers("auto", LLAMA8B, free_vram_bytes=H100_FREE, ctx=4096, cap=20)
    assert layers == 20 and "capped at 20" in reason


def test_auto_without_a_gpu_is_cpu_only() -> None:
    layers, reason = choose_gpu_layers("auto", LLAMA8B, free_vram_bytes=None)
    assert layers == 0 and "CPU only" in reason


def test_auto_when_not_even_the_output_layer_fits() -> None:
    layers, reason = choose_gpu_layers("auto", LLAMA8B, free_vram_bytes=700 * MiB, ctx=4096)
    assert layers == 0 and "no room" in reason


@pytest.mark.parametrize("setting", ["max", "all"])
def test_max_is_every_layer_and_says_whether_it_fits(setting: str) -> None:
    layers, reason = choose_gpu_layers(setting, LLAMA8B, free_vram_bytes=SMALL_CARD_FREE)  # type: ignore[arg-type]
    assert layers == 33 and "may NOT fit" in reason
    layers, reason = choose_gpu_layers("max", SMOLLM2, free_vram_bytes=H100_FREE)
    assert layers == 31 and "fits" in reason


def test_a_number_is_used_as_given_capped_at_the_layer_count() -> None:
    assert choose_gpu_layers(12, LLAMA8B, free_vram_bytes=H100_FREE).layers == 12
    layers, reason = choose_gpu_layers(99, LLAMA8B, free_vram_bytes=None)
    assert layers == 33 and "the model has 33" in reason and "unknown" in reason


@pytest.mark.parametrize("setting", [-1, "most"])
def test_bad_settings(setting: object) -> None:
    with pytest.raises(ConfigError):
        choose_gpu_layers(setting, LLAMA8B, free_vram_bytes=H100_FREE)  # type: ignore[arg-type]
