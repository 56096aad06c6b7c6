"""Synthetic GGUF models of real architectures, for checking the memory estimate.

``python -m tests.corpus [--ci | --bench] [--list]`` writes them (or says where
they are); tests and ``bench/memory.py`` call :func:`model_path`. Each file has
an architecture's real tensor names, shapes and metadata (taken from the
published configs named in :data:`SHAPES`) and random weights: llama.cpp sizes
every buffer from the shapes alone, so the memory a server takes is the
memory the real model would take, while the text it writes is noise.

Quantised blocks are random bytes with their fp16 scales set to a small
constant, so that activations stay finite. The mixes follow llama-quantize's
main rules (output head Q6_K; Q4_K_M puts attn_v/ffn_down in Q6_K on some
layers; a row not divisible by 256 falls back to Q5_0/Q8_0), which is what
matters for size and for which tensors the CPU backend repacks.

The vocabulary is a SentencePiece one of the right size (unk, bos, eos, the
256 byte tokens, then short words); prompts are sent as token ids.

Files are cached under ``$LLAMACTL_CORPUS_DIR`` (default
``~/.cache/llamactl-corpus``), named by a hash of everything that shapes them.
The CI set is a few MB in all; the bench set is hundreds of MB per file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BENCH", "CI", "QUANTS", "SHAPES", "Shape", "Spec", "corpus_dir", "model_path"]

#: what this module writes: bump when the layout of a file changes
_VERSION = 2


@dataclass(frozen=True, kw_only=True)
class Shape:
    """An architecture's dimensions, as its GGUF metadata states them."""

    arch: str
    source: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    tied: bool = True
    sliding_window: int = 0
    n_expert: int = 0
    n_expert_used: int = 0
    #: qwen2's q/k/v biases; qwen3/gemma3's per-head q/k norms; phi3's fused qkv
    qkv_bias: bool = False
    qk_norm: bool = False
    fused_qkv: bool = False
    #: multi-head latent attention (deepseek2): the ranks and head parts; 0 = none
    q_lora: int = 0
    kv_lora: int = 0
    rope_dim: int = 0
    v_head: int = 0
    #: deepseek2: dense layers before the mixture of experts, and shared experts
    n_dense_lead: int = 0
    n_expert_shared: int = 0


SHAPES: dict[str, Shape] = {
    "llama-135m": Shape(  # SmolLM2-135M (the demo model's shape)
        arch="llama", source="HuggingFaceTB/SmolLM2-135M", n_layer=30, n_embd=576,
        n_ff=1536, n_head=9, n_head_kv=3, head_dim=64, n_vocab=49152, n_ctx_train=8192),
    "llama-1b": Shape(  # Llama-3.2-1B
        arch="llama", source="meta-llama/Llama-3.2-1B", n_layer=16, n_embd=2048,
        n_ff=8192, n_head=32, n_head_kv=8, head_dim=64, n_vocab=128256, n_ctx_train=131072),
    "qwen2-0.5b": Shape(  # Qwen2.5-0.5B
        arch="qwen2", source="Qwen/Qwen2.5-0.5B", n_layer=24, n_embd=896, n_ff=4864,
        n_head=14, n_head_kv=2, head_dim=64, n_vocab=151936, n_ctx_train=32768, qkv_bias=True),
    "qwen3-0.6b": Shape(  # Qwen3-0.6B
        arch="qwen3", source="Qwen/Qwen3-0.6B", n_layer=28, n_embd=1024, n_ff=3072,
        n_head=16, n_head_kv=8, head_dim=128, n_vocab=151936, n_ctx_train=40960, qk_norm=True),
    "gemma3-270m": Shape(  # gemma-3-270m: 5 of every 6 layers slide over 512 tokens
        arch="gemma3", source="google/gemma-3-270m", n_layer=18, n_embd=640, n_ff=2048,
        n_head=4, n_head_kv=1, head_dim=256, n_vocab=262144, n_ctx_train=32768,
        sliding_window=512, qk_norm=True),
    "granitemoe-1b": Shape(  # granite-3.0-1b-a400m: 32 experts, 8 used
        arch="granitemoe", source="ibm-granite/granite-3.0-1b-a400m-base", n_layer=24,
        n_embd=1024, n_ff=512, n_head=16, n_head_kv=8, head_dim=64, n_vocab=49155,
        n_ctx_train=4096, n_expert=32, n_expert_used=8),
    "phi3-4l": Shape(  # Phi-3-mini-4k-instruct's layer shapes, 4 of its 32 layers
        arch="phi3", source="microsoft/Phi-3-mini-4k-instruct (4 layers)", n_layer=4,
        n_embd=3072, n_ff=8192, n_head=32, n_head_kv=32, head_dim=96, n_vocab=32064,
        n_ctx_train=4096, tied=False, sliding_window=2047, fused_qkv=True),
    # DeepSeek-V2's attention and dense-layer shapes, 2 of its 60 layers
    "deepseek2-2l": Shape(
        arch="deepseek2", source="deepseek-ai/DeepSeek-V2 (2 dense layers)", n_layer=2,
        n_embd=5120, n_ff=12288, n_head=128, n_head_kv=1, head_dim=192, n_vocab=102400,
        n_ctx_train=163840, tied=False, q_lora=1536, kv_lora=512, rope_dim=64, v_head=128,
        n_dense_lead=2),
}  # fmt: skip


def _tiny(name: str, **dims: int) -> Shape:
    """The same architecture at a few MB: real metadata, small dimensions."""
    base = SHAPES[name]
    return replace(base, source=f"{base.source}, shrunk", **dims)


TINY: dict[str, Shape] = {
    "llama-tiny": _tiny("llama-135m", n_layer=4, n_embd=256, n_ff=768, n_head=4,
                        n_head_kv=2, n_vocab=4096),
    "qwen3-tiny": _tiny("qwen3-0.6b", n_layer=4, n_embd=256, n_ff=512, n_head=4,
                        n_head_kv=2, head_dim=64, n_vocab=8192),
    "gemma3-tiny": _tiny("gemma3-270m", n_layer=6, n_embd=256, n_ff=512, n_head=2,
                         n_head_kv=1, head_dim=128, n_vocab=8192, sliding_window=128),
    "mla-tiny": _tiny("deepseek2-2l", n_layer=3, n_embd=256, n_ff=512, n_head=4, q_lora=64,
                      kv_lora=64, rope_dim=32, head_dim=64, v_head=32, n_vocab=4096,
                      n_dense_lead=1, n_expert=4, n_expert_used=2, n_expert_shared=1),
    "moe-tiny": _tiny("granitemoe-1b", n_layer=3, n_embd=256, n_ff=256, n_head=4,
                      n_head_kv=2, n_expert=8, n_expert_used=2, n_vocab=4096),
}  # fmt: skip

QUANTS = ("F16", "Q8_0", "Q4_0", "Q4_K_M", "IQ4_NL")


@dataclass(frozen=True, kw_only=True)
class Spec:
    """One file of the corpus: a shape in a quantisation."""

    name: str
    quant: str

    @property
    def shape(self) -> Shape:
        return {**SHAPES, **TINY}[self.name]

    @property
    def label(self) -> str:
        return f"{self.name} {self.quant}"


#: the CI corpus: every tiny architecture, the repacked and plain quants on one of them
CI: tuple[Spec, ...] = (
    *(Spec(name="llama-tiny", quant=q) for q in QUANTS),
    Spec(name="qwen3-tiny", quant="Q8_0"),
    Spec(name="gemma3-tiny", quant="Q4_0"),
    Spec(name="moe-tiny", quant="Q4_K_M"),
    Spec(name="mla-tiny", quant="Q8_0"),
)
#: the bench corpus: real shapes, ~135M to ~1.3B parameters
BENCH: tuple[Spec, ...] = (
    *(Spec(name="qwen2-0.5b", quant=q) for q in QUANTS),
    Spec(name="qwen3-0.6b", quant="Q8_0"),
    Spec(name="gemma3-270m", quant="Q4_K_M"),
    Spec(name="granitemoe-1b", quant="Q4_0"),
    Spec(name="phi3-4l", quant="IQ4_NL"),
    Spec(name="llama-1b", quant="Q4_K_M"),
)


def corpus_dir() -> Path:
    return Path(os.environ.get("LLAMACTL_CORPUS_DIR") or Path.home() / ".cache/llamactl-corpus")


_MLA_FIELDS = ("q_lora", "kv_lora", "rope_dim", "v_head", "n_dense_lead", "n_expert_shared")


def model_path(spec: Spec) -> Path:
    """The file for *spec*, written on first use (atomically: a rename)."""
    # the MLA fields came later: left out at 0 so that the other files keep their names
    shape = {k: v for k, v in asdict(spec.shape).items() if v or k not in _MLA_FIELDS}
    key = json.dumps([_VERSION, shape, spec.quant], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = corpus_dir() / f"{spec.name}-{spec.quant}-{digest}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            _write(spec, tmp)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


# -- tensors --------------------------------------------------------------------------------------
#: name -> (values per block, bytes per block, byte offsets of fp16 scales in a block)
_BLOCKS: dict[str, tuple[int, int, tuple[int, ...]]] = {
    "Q8_0": (32, 34, (0,)),
    "Q4_0": (32, 18, (0,)),
    "IQ4_NL": (32, 18, (0,)),
    "Q5_0": (32, 22, (0,)),
    "Q4_K": (256, 144, (0, 2)),
    "Q6_K": (256, 210, (208,)),
}
_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}  # llama-quantize, for rows not divisible by 256
_SCALE = np.array([2.0**-9], dtype=np.float16).view(np.uint8)


def _tensor_type(quant: str, role: str, il: int, n_layer: int) -> str:
    if quant in ("F16", "Q8_0"):
        return quant
    if role == "output":
        return "Q6_K"
    if quant == "Q4_K_M":
        # llama-quantize's use_more_bits(): the first and last eighth, and every third between
        more = il < n_layer // 8 or il >= 7 * n_layer // 8 or (il - n_layer // 8) % 3 == 2
        return "Q6_K" if role in ("attn_v", "ffn_down") and more else "Q4_K"
    return quant


def _data(rng: np.random.Generator, shape: tuple[int, ...], ttype: str) -> np.ndarray:
    """Random weights of ``shape`` (numpy order: rows last-but-one, row length last)."""
    if ttype == "F32":
        return np.ones(shape, dtype=np.float32)
    if ttype == "F16":
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
    per, size, scales = _BLOCKS[ttype]
    n_blocks = shape[-1] // per
    raw = rng.integers(0, 256, size=(*shape[:-1], n_blocks, size), dtype=np.uint8)
    for off in scales:
        raw[..., off : off + 2] = _SCALE
    return raw.reshape(*shape[:-1], n_blocks * size)


def _write(spec: Spec, path: Path) -> None:  # noqa: PLR0915 - one tensor list, read top down
    import gguf

    s, quant = spec.shape, spec.quant
    rng = np.random.default_rng(int(hashlib.sha256(spec.label.encode()).hexdigest()[:8], 16))
    w = gguf.GGUFWriter(str(path), s.arch)
    _metadata(w, s, quant)

    def add(name: str, shape: tuple[int, ...], role: str = "", il: int = 0) -> None:
        if len(shape) == 1 or role == "ffn_gate_inp":  # llama-quantize keeps these in F32
            ttype = "F32"
        else:
            ttype = _tensor_type(quant, role, il, s.n_layer)
            if ttype in _BLOCKS and shape[-1] % _BLOCKS[ttype][0]:
                ttype = _FALLBACK.get(ttype, "F16")
        data = _data(rng, shape, ttype)
        qtype = gguf.GGMLQuantizationType[ttype]
        w.add_tensor(name, data, raw_dtype=qtype if ttype in _BLOCKS else None)

    embd, q_dim, kv_dim = s.n_embd, s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    add("token_embd.weight", (s.n_vocab, embd), "output" if s.tied else "embd")
    for il in range(s.n_layer):
        blk = f"blk.{il}."
        add(blk + "attn_norm.weight", (embd,))
        if s.kv_lora:
            _mla_layer(s, blk, il, add)
            continue
        if s.fused_qkv:
            add(blk + "attn_qkv.weight", (q_dim + 2 * kv_dim, embd), "attn_qkv", il)
        else:
            add(blk + "attn_q.weight", (q_dim, embd), "attn_q", il)
            add(blk + "attn_k.weight", (kv_dim, embd), "attn_k", il)
            add(blk + "attn_v.weight", (kv_dim, embd), "attn_v", il)
        if s.qkv_bias:
            for part, dim in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                add(blk + f"attn_{part}.bias", (dim,))
        if s.qk_norm:
            add(blk + "attn_q_norm.weight", (s.head_dim,))
            add(blk + "attn_k_norm.weight", (s.head_dim,))
        add(blk + "attn_output.weight", (embd, q_dim), "attn_output", il)
        if s.arch == "gemma3":
            add(blk + "post_attention_norm.weight", (embd,))
            add(blk + "post_ffw_norm.weight", (embd,))
        add(blk + "ffn_norm.weight", (embd,))
        if s.n_expert:
            add(blk + "ffn_gate_inp.weight", (s.n_expert, embd), "ffn_gate_inp", il)
            add(blk + "ffn_gate_exps.weight", (s.n_expert, s.n_ff, embd), "ffn_gate", il)
            add(blk + "ffn_up_exps.weight", (s.n_expert, s.n_ff, embd), "ffn_up", il)
            add(blk + "ffn_down_exps.weight", (s.n_expert, embd, s.n_ff), "ffn_down", il)
        elif s.fused_qkv:  # phi3: gate and up in one tensor
            add(blk + "ffn_up.weight", (2 * s.n_ff, embd), "ffn_up", il)
            add(blk + "ffn_down.weight", (embd, s.n_ff), "ffn_down", il)
        else:
            add(blk + "ffn_gate.weight", (s.n_ff, embd), "ffn_gate", il)
            add(blk + "ffn_up.weight", (s.n_ff, embd), "ffn_up", il)
            add(blk + "ffn_down.weight", (embd, s.n_ff), "ffn_down", il)
    add("output_norm.weight", (embd,))
    if not s.tied:
        add("output.weight", (s.n_vocab, embd), "output")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _mla_layer(s: Shape, blk: str, il: int, add: Any) -> None:
    """deepseek2's layer as llama.cpp b11312 reads it (src/models/deepseek2.cpp), split k_b/v_b."""
    embd, nope = s.n_embd, s.head_dim - s.rope_dim
    add(blk + "attn_q_a_norm.weight", (s.q_lora,))
    add(blk + "attn_kv_a_norm.weight", (s.kv_lora,))
    add(blk + "attn_q_a.weight", (s.q_lora, embd), "attn_q", il)
    add(blk + "attn_q_b.weight", (s.n_head * s.head_dim, s.q_lora), "attn_q", il)
    add(blk + "attn_kv_a_mqa.weight", (s.kv_lora + s.rope_dim, embd), "attn_k", il)
    add(blk + "attn_k_b.weight", (s.n_head, s.kv_lora, nope), "attn_k", il)
    add(blk + "attn_v_b.weight", (s.n_head, s.v_head, s.kv_lora), "attn_v", il)
    add(blk + "attn_output.weight", (embd, s.n_head * s.v_head), "attn_output", il)
    add(blk + "ffn_norm.weight", (embd,))
    if il < s.n_dense_lead:
        add(blk + "ffn_gate.weight", (s.n_ff, embd), "ffn_gate", il)
        add(blk + "ffn_up.weight", (s.n_ff, embd), "ffn_up", il)
        add(blk + "ffn_down.weight", (embd, s.n_ff), "ffn_down", il)
        return
    ff, shared = s.n_ff // 2, s.n_ff // 2 * s.n_expert_shared
    add(blk + "ffn_gate_inp.weight", (s.n_expert, embd), "ffn_gate_inp", il)
    add(blk + "ffn_gate_exps.weight", (s.n_expert, ff, embd), "ffn_gate", il)
    add(blk + "ffn_up_exps.weight", (s.n_expert, ff, embd), "ffn_up", il)
    add(blk + "ffn_down_exps.weight", (s.n_expert, embd, ff), "ffn_down", il)
    add(blk + "ffn_gate_shexp.weight", (shared, embd), "ffn_gate", il)
    add(blk + "ffn_up_shexp.weight", (shared, embd), "ffn_up", il)
    add(blk + "ffn_down_shexp.weight", (embd, shared), "ffn_down", il)


_FILE_TYPES = {"F16": 1, "Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15, "IQ4_NL": 25}


def _metadata(w: Any, s: Shape, quant: str) -> None:
    w.add_name(f"llamactl corpus {s.arch} ({s.source}), random weights")
    w.add_file_type(_FILE_TYPES[quant])
    w.add_block_count(s.n_layer)
    w.add_context_length(s.n_ctx_train)
    w.add_embedding_length(s.n_embd)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    if not s.kv_lora:
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    if s.sliding_window:
        w.add_sliding_window(s.sliding_window)
    if s.n_expert:
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(s.n_expert_used)
    if s.arch == "granitemoe":
        w.add_logit_scale(1.0)
    if s.kv_lora:  # MLA: the cache holds the compressed latent and the rope part, no V
        w.add_key_length(s.kv_lora + s.rope_dim)
        w.add_value_length(s.kv_lora)
        w.add_key_length_mla(s.head_dim)
        w.add_value_length_mla(s.v_head)
        w.add_rope_dimension_count(s.rope_dim)
        w.add_q_lora_rank(s.q_lora)
        w.add_kv_lora_rank(s.kv_lora)
        w.add_leading_dense_block_count(s.n_dense_lead)
        w.add_expert_feed_forward_length(s.n_ff // 2)
        w.add_expert_shared_count(s.n_expert_shared)
    # phi3's vocabulary loader looks <|endoftext|> up by name
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "<|endoftext|>"]
    n_special = len(tokens)
    tokens += [f"\u2581w{i}" for i in range(s.n_vocab - n_special)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_special + [-float(i) for i in range(len(tokens) - n_special)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [3] + [1] * (len(tokens) - n_special))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="the bench set too (GBs)")
    args = parser.parse_args(argv)
    for spec in (*CI, *(BENCH if args.bench else ())):
        path = model_path(spec)
        print(f"{spec.label:28} {path.stat().st_size / 2**20:9.1f} MiB  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
