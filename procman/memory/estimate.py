"""Predict how much host RAM and device memory a llama-server will take.

The supervisor admits a server only if its estimate fits the budget, so the
estimate follows llama.cpp b11312's own sizing rules rather than a rule of
thumb (file references are to that tree):

* context: ``n_ctx`` is rounded up to 256; without ``--kv-unified`` each of
  the ``-np`` slots gets its own stream of ``pad256(n_ctx / np)`` cells
  (src/llama-context.cpp), with it one stream of ``n_ctx`` cells is shared.
  llama-server only turns unified on by itself when ``-np`` is not given
  (tools/server/server.cpp: auto = 4 slots, unified).
* KV cache: per layer, ``cells x n_head_kv x head_dim`` elements for K and
  for V, in the cache type's block size (q8_0 = 34 bytes per 32 values).
  Sliding-window layers hold ``pad256(min(n_ctx_seq, window x seqs + n_ubatch))``
  cells per stream (src/llama-kv-cache-iswa.cpp) unless ``--swa-full``.
* weights: ``-ngl N`` offloads the output layer first, then the *last* N-1
  repeating layers (src/llama-model.cpp ``i_gpu_start = n_layer + 1 - ngl``);
  token_embd always stays on the host, and a tied output head is copied to
  the device when the output layer is offloaded.
* compute buffers: what ggml's graph allocator reserves for one ubatch. The
  live set peaks in the feed-forward block (or, without flash attention, in
  the KQ matrix); coefficients were calibrated against the ``compute buffer
  size`` lines of the CPU build (see ``_compute_bytes``).
* a process overhead (binary, vocabulary, threads, HTTP) measured as peak
  RSS minus the buffers above.

Two things grow *after* start and are reported apart, as ``host_growth_bytes``:
the prompt cache (``--cache-ram``, 8 GiB by default in llama-server, so pass
it explicitly) and, for sliding-window models, up to ``--ctx-checkpoints``
(32) saved SWA states per slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from procman.errors import ConfigError
from procman.models.gguf import ModelInfo

__all__ = [
    "CACHE_TYPES",
    "COMPONENTS",
    "COMPUTE_SLACK",
    "DEVICE_OVERHEAD",
    "HOST_OVERHEAD_BASE",
    "HOST_OVERHEAD_PER_SLOT_VOCAB_TOKEN",
    "HOST_OVERHEAD_PER_VOCAB_TOKEN",
    "Estimate",
    "MiB",
    "estimate",
]

MiB = 1024 * 1024

#: KV cache types llama-server accepts (common/arg.cpp kv_cache_types):
#: name -> (values per block, bytes per block), as ggml's type traits
CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "iq4_nl": (32, 18),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
}

#: breakdown keys, in display order
COMPONENTS = ("weights", "kv_cache", "compute", "output", "checkpoints", "overhead")

#: peak RSS of the CPU llama-server (b11312, static build) minus its model,
#: KV, compute and output buffers was 28-43 MiB across ctx 512..8192, -np 1/4
#: and three model shapes, all with the same 49,152-token vocabulary. The
#: split into a fixed part and ~256 B per token (strings, maps and merges of
#: the vocabulary) is an assumption: no second vocabulary size was measured.
HOST_OVERHEAD_BASE = 24 * MiB
HOST_OVERHEAD_PER_VOCAB_TOKEN = 256
#: each slot's sampler holds candidate arrays over the whole vocabulary (common/sampling.cpp
#: ``cur``, 12 bytes a token, and the chain's own copies): 20 B a token a slot was measured
#: on the 151,936-token qwen2 shape (peak RSS at -np 4 less -np 1, tests/corpus.py)
HOST_OVERHEAD_PER_SLOT_VOCAB_TOKEN = 24
#: context checkpoints one prompt creates in a slot (server-context.cpp
#: ``checkpoint_offsets = {4 + n_ubatch, 4}``): held from the first request on
FIRST_PROMPT_CHECKPOINTS = 2
#: device memory a GPU process takes before any buffer (CUDA context, loaded
#: kernels, cuBLAS workspace). Measured on an H200 (CUDA 13.0, driver 580, the
#: default CUDA build for sm_90): NVML's figure for llama-server less the
#: estimated buffers was 591 MiB with 5/5 layers offloaded and 592 with 2/5
#: (tests/integration/test_cuda.py). Smaller GPUs may take somewhat less.
DEVICE_OVERHEAD = 592 * MiB

#: the live-set model below matched SmolLM2 to 0.01 MiB but read 0.5-0.8 MiB low on
#: gemma3 shapes (gemma-3-270m 18.01 vs 18.77 MiB; 7.01 vs 7.51 without flash attention
#: at 8 streams): post-norms and ggml-alloc's first-fit fragmentation. An estimate that
#: is low is an OOM, one that is high only leaves memory unused, so the model is scaled
#: by this factor (checked against every corpus row, tests/unit/test_estimate_corpus.py)
COMPUTE_SLACK = 1.08

_LLAMA_MAX_SEQ = 256


def _pad(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """Predicted memory of one llama-server, in bytes."""

    host_bytes: int
    device_bytes: int
    #: component (see COMPONENTS) -> {"host": bytes, "device": bytes}
    breakdown: dict[str, dict[str, int]] = field(hash=False)
    #: host memory the server may add while it runs (prompt cache, SWA checkpoints);
    #: not part of host_bytes
    host_growth_bytes: int = 0
    growth: dict[str, int] = field(default_factory=dict, hash=False)
    #: the resolved llama.cpp parameters the numbers follow from (n_ctx after
    #: padding, cells per stream, flash attention...), for display and debugging
    settings: dict[str, Any] = field(hash=False)

    @property
    def total_bytes(self) -> int:
        return self.host_bytes + self.device_bytes

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the project's ``to_json`` convention: dumping is the caller's)."""
        return {
            "host_bytes": self.host_bytes,
            "device_bytes": self.device_bytes,
            "breakdown": {k: dict(v) for k, v in self.breakdown.items()},
            "host_growth_bytes": self.host_growth_bytes,
            "growth": dict(self.growth),
            "settings": dict(self.settings),
        }


def estimate(
    info: ModelInfo,
    *,
    ctx: int = 0,
    parallel: int | None = 1,
    gpu_layers: int = 0,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
    n_batch: int = 2048,
    n_ubatch: int = 512,
    flash_attn: bool | None = None,
    kv_unified: bool = False,
    swa_full: bool = False,
    cache_ram: int = 0,
    ctx_checkpoints: int = 32,
    host_overhead: int | None = None,
    device_overhead: int = DEVICE_OVERHEAD,
    mmap: bool = True,
    repack: bool = True,
) -> Estimate:
    """Predict host and device bytes for ``llama-server -m info.path`` with these flags.

    Arguments mirror llama-server's: ``ctx`` is ``-c`` (0 = the training
    context), the total over all ``parallel`` slots (None: llama-server's
    own default when ``-np`` is not given, 4 unified slots); ``gpu_layers`` is
    ``-ngl`` (negative = all; a CPU-only build offloads nothing, so pass 0);
    ``flash_attn`` None is ``auto``, which the CPU and CUDA backends resolve
    to on. ``cache_ram`` is the prompt-cache limit in bytes (``--cache-ram``
    takes MiB) and ``ctx_checkpoints`` is ``--ctx-checkpoints``; both only
    feed ``host_growth_bytes``. ``host_overhead`` defaults to the measured
    CPU-build overhead. ``mmap`` False is ``--load-mode none`` (``--no-mmap``);
    ``repack`` False is a CPU that repacks nothing (no AVX2, or
    ``--no-repack``): the default counts the repack copies x86-64 with AVX2 makes.
    """
    k_block = _cache_type(cache_type_k, "--cache-type-k")
    v_block = _cache_type(cache_type_v, "--cache-type-v")
    if flash_attn is False and v_block[0] > 1:
        raise ConfigError(
            f"a quantized V cache ({cache_type_v}) needs flash attention",
            hint="drop --flash-attn off, or use --cache-type-v f16",
        )
    fa = flash_attn is not False
    if parallel is None:  # tools/server/server.cpp: -np auto = 4 slots sharing one KV buffer
        parallel, kv_unified = 4, True
    lay = _layout(
        info,
        ctx=ctx,
        parallel=parallel,
        kv_unified=kv_unified,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        swa_full=swa_full,
    )
    ngl, on_gpu, output_on_gpu = _placement(info, gpu_layers)

    weights = _Split(host=info.input_tensor_bytes)
    for il, n_bytes in enumerate(info.layer_tensor_bytes):
        weights.add(n_bytes, device=il < info.n_layers and on_gpu[il])
    weights.add(info.output_tensor_bytes, device=output_on_gpu)
    if info.tied_embeddings and output_on_gpu:
        # token_embd (nearly all of the input bytes) is copied for the output head
        weights.device += info.input_tensor_bytes
    repacked = _repack_bytes(info, on_gpu, output_on_gpu, mmap=mmap) if repack else 0
    weights.host += repacked

    kv = _Split()
    swa_row_bytes = 0
    for il in range(info.n_layers):
        row, swa = _kv_row_bytes(info, il, (k_block, cache_type_k), (v_block, cache_type_v))
        cells = (lay.cells_swa if swa else lay.n_ctx_seq) * lay.n_stream
        kv.add(cells * row, device=on_gpu[il])
        swa_row_bytes += row if swa else 0

    compute_full = _compute_bytes(
        info,
        n_ubatch=lay.n_ubatch,
        n_kv=lay.n_ctx_seq,
        n_kv_swa=lay.cells_swa,
        flash_attn=fa,
        n_out=parallel,
    )
    # reserved for the whole context even past n_ctx_train, where llama-server caps a
    # slot: the pages are resident all the same (llama-tiny at -c 16384, trained on
    # 8192, without flash attention peaked with all 163 MiB of its compute buffer)
    compute = _Split(host=compute_full)
    if ngl > 0:
        compute.device = compute_full
        if all(on_gpu) and output_on_gpu:
            # the host only embeds the input tokens; with layers left on the CPU
            # it reserves a full graph of its own
            compute.host = lay.n_ubatch * (4 * info.n_embd + 24)

    if host_overhead is None:
        host_overhead = HOST_OVERHEAD_BASE + info.n_vocab * (
            HOST_OVERHEAD_PER_VOCAB_TOKEN + HOST_OVERHEAD_PER_SLOT_VOCAB_TOKEN * parallel
        )
    # a checkpoint saves one slot's sliding-window cells (server-context.cpp create_checkpoint)
    # in host memory; the first prompt of each slot makes up to two, more prompts up to
    # --ctx-checkpoints
    checkpoint = min(lay.n_ctx_seq, info.sliding_window + lay.n_ubatch) * swa_row_bytes
    n_checkpoints = max(ctx_checkpoints, 0)
    first = min(n_checkpoints, FIRST_PROMPT_CHECKPOINTS)
    parts = {
        "weights": weights,
        "kv_cache": kv,
        "compute": compute,
        "output": _Split(host=4 * info.n_vocab * parallel),  # logits of one token per slot
        "checkpoints": _Split(host=parallel * first * checkpoint),
        "overhead": _Split(host=host_overhead, device=device_overhead if ngl > 0 else 0),
    }
    growth = {
        "prompt_cache": max(cache_ram, 0),
        "checkpoints": parallel * (n_checkpoints - first) * checkpoint,
    }
    settings: dict[str, Any] = {
        "n_ctx": lay.n_ctx,
        "n_ctx_seq": lay.n_ctx_seq,
        "n_stream": lay.n_stream,
        "parallel": parallel,
        "kv_unified": lay.n_stream == 1,
        "n_batch": lay.n_batch,
        "n_ubatch": lay.n_ubatch,
        "flash_attn": fa,
        "cache_type_k": cache_type_k.lower(),
        "cache_type_v": cache_type_v.lower(),
        "gpu_layers": ngl,
        "output_on_device": output_on_gpu,
        "kv_cells": lay.n_ctx_seq * lay.n_stream,
        "kv_cells_swa": lay.cells_swa * lay.n_stream if info.n_swa_layers else 0,
        "swa_layers": info.n_swa_layers,
        "mmap": mmap,
        "repack_bytes": repacked,
    }
    return Estimate(
        host_bytes=sum(s.host for s in parts.values()),
        device_bytes=sum(s.device for s in parts.values()),
        breakdown={name: {"host": s.host, "device": s.device} for name, s in parts.items()},
        host_growth_bytes=sum(growth.values()),
        growth=growth,
        settings=settings,
    )


@dataclass(frozen=True)
class _Layout:
    n_ctx: int
    n_ctx_seq: int
    n_stream: int
    n_batch: int
    n_ubatch: int
    #: cells per stream of the sliding-window cache
    cells_swa: int


def _layout(
    info: ModelInfo,
    *,
    ctx: int,
    parallel: int,
    kv_unified: bool,
    n_batch: int,
    n_ubatch: int,
    swa_full: bool,
) -> _Layout:
    """Context geometry as llama_context and llama_kv_cache_iswa resolve it."""
    if not 1 <= parallel <= _LLAMA_MAX_SEQ:
        raise ConfigError(f"parallel must be between 1 and {_LLAMA_MAX_SEQ}, not {parallel}")
    if ctx < 0:
        raise ConfigError(f"ctx must be 0 (the model's training context) or positive, not {ctx}")
    if n_batch < 1 or n_ubatch < 1:
        raise ConfigError("n_batch and n_ubatch must be positive")
    n_ctx = _pad(ctx or info.n_ctx_train)
    if kv_unified or parallel == 1:
        n_stream, n_ctx_seq = 1, n_ctx
    else:
        n_stream, n_ctx_seq = parallel, _pad(n_ctx // parallel)
        n_ctx = n_ctx_seq * parallel
    n_batch = min(n_ctx, n_batch)
    n_ubatch = min(n_batch, n_ubatch)
    cells_swa = n_ctx_seq
    if info.sliding_window and not swa_full:
        seqs_per_stream = parallel if n_stream == 1 else 1
        cells_swa = _pad(min(n_ctx_seq, info.sliding_window * seqs_per_stream + n_ubatch))
    return _Layout(n_ctx, n_ctx_seq, n_stream, n_batch, n_ubatch, cells_swa)


def _repack_bytes(info: ModelInfo, on_gpu: list[bool], output_on_gpu: bool, *, mmap: bool) -> int:
    """Host bytes the CPU backend's repack copies add to the weights.

    A repacked matrix lives in a ``CPU_REPACK`` buffer of its own size. With
    mmap, its bytes were read through the mapping to convert them, and those
    file pages stay resident and mapped (llama-model-loader.cpp only unmaps the
    ranges before the first and after the last mapped tensor), so the weights
    are held twice. Without mmap the repack buffer replaces the plain one,
    except for a tied output head, whose copy sits beside the input's.
    """
    tied = info.output_repack_bytes if info.tied_embeddings and not output_on_gpu else 0
    if not mmap:
        return tied
    layers = sum(
        n for il, n in enumerate(info.layer_repack_bytes) if not (il < len(on_gpu) and on_gpu[il])
    )
    return layers + (0 if output_on_gpu else info.output_repack_bytes)


def _placement(info: ModelInfo, gpu_layers: int) -> tuple[int, list[bool], bool]:
    """(-ngl as applied, per-layer on-device flags, output layer on device)."""
    n_layers = info.n_layers
    ngl = n_layers + 1 if gpu_layers < 0 else min(gpu_layers, n_layers + 1)
    first_gpu_layer = n_layers + 1 - ngl
    return ngl, [il >= first_gpu_layer for il in range(n_layers)], ngl >= 1


def _kv_row_bytes(
    info: ModelInfo,
    il: int,
    k: tuple[tuple[int, int], str],
    v: tuple[tuple[int, int], str],
) -> tuple[int, bool]:
    """(bytes of one KV cell in layer *il*, whether the layer slides)."""
    heads = info.layer_n_head_kv[il] if il < len(info.layer_n_head_kv) else info.n_head_kv
    swa = info.swa_layers[il] if il < len(info.swa_layers) else False
    if heads == 0:  # recurrent or KV-sharing layer: no cache of its own
        return 0, swa
    dim_k = info.head_dim_k_swa if swa else info.head_dim_k
    dim_v = info.head_dim_v_swa if swa else info.head_dim_v
    row = _row_bytes(heads * dim_k, *k)
    if not info.mla:  # MLA keeps V inside the compressed K rows
        row += _row_bytes(heads * dim_v, *v)
    return row, swa


@dataclass
class _Split:
    host: int = 0
    device: int = 0

    def add(self, n_bytes: int, *, device: bool) -> None:
        if device:
            self.device += n_bytes
        else:
            self.host += n_bytes


def _cache_type(name: str, flag: str) -> tuple[int, int]:
    block = CACHE_TYPES.get(name.lower())
    if block is None:
        import difflib  # speed

        close = difflib.get_close_matches(name.lower(), CACHE_TYPES, n=1)
        hint = f"did you mean {close[0]}?" if close else f"use one of {', '.join(CACHE_TYPES)}"
        raise ConfigError(f"unknown KV cache type {name!r} for {flag}", hint=hint)
    return block


def _row_bytes(n_values: int, block: tuple[int, int], name: str) -> int:
    per_block, block_bytes = block
    if n_values % per_block:
        raise ConfigError(
            f"KV cache type {name} packs {per_block} values per block, but this model's "
            f"K/V rows hold {n_values} values",
            hint="use --cache-type-k/--cache-type-v f16 for this model",
        )
    return n_values // per_block * block_bytes


def _compute_bytes(
    info: ModelInfo, *, n_ubatch: int, n_kv: int, n_kv_swa: int, flash_attn: bool, n_out: int
) -> int:
    """Bytes ggml's allocator reserves for one ubatch's graph (one backend).

    Calibrated on SmolLM2-135M (n_embd 576, n_ff 1536, 9/3 heads) with the CPU
    build: with flash attention the buffer was ``ub x (27,668 + 2 x n_kv)``
    bytes for ub 64..2048 and n_kv 256..8192 (exact to 0.01 MiB), i.e. the
    feed-forward block's live f32 tensors (3 x n_ff + 4 x n_embd) plus the
    f16 KQ mask; without it ``6.38 MiB + ub x n_kv x 4 x (n_head + 1)``, the
    f32 KQ scores and mask. Other architectures reuse the same shape, scaled
    by :data:`COMPUTE_SLACK` so that it is never below the server's buffer.
    """
    ub = n_ubatch
    n_q = info.n_head * info.head_dim_k or info.n_embd
    n_kv_dim = info.n_head_kv * (info.head_dim_k + info.head_dim_v)
    if info.n_expert and info.n_expert_used:
        # granitemoe states the experts' width as feed_forward_length
        ffn_width = (info.n_ff_expert or info.n_ff) * info.n_expert_used + info.n_expert
    else:
        ffn_width = info.n_ff
    inputs = 24 * ub  # token ids, positions, KV slot indices
    ffn = 4 * ub * (3 * ffn_width + 4 * info.n_embd)
    attn = 4 * ub * (2 * info.n_embd + 3 * n_q + n_kv_dim)
    swa = info.sliding_window > 0
    if flash_attn:
        mask = 2 * ub * (n_kv + (n_kv_swa if swa else 0))
        peak = max(ffn, attn)
    else:
        mask = 4 * ub * (n_kv_swa if swa else 0)
        peak = max(ffn, attn + 4 * ub * n_kv * (info.n_head + 1))
    # the output head runs last, when only the final hidden states are alive
    logits = 4 * (info.n_vocab * n_out + 2 * ub * info.n_embd)
    return int((max(peak, logits) + mask + inputs) * COMPUTE_SLACK)
