"""What a GGUF header says about a model: the value the rest of llamactl reads.

Apart from the reader (:mod:`procman.models.gguf`) so that the validation cache
(:mod:`procman.models._info_cache`) can rebuild one without importing the reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelInfo"]


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What the GGUF header says about a model, in llama.cpp's terms."""

    path: Path
    size_bytes: int
    gguf_version: int
    architecture: str
    #: ``general.name``; None when the converter did not set it
    name: str | None
    #: quantisation label (``Q4_1``, ``F16``...) from ``general.file_type``, else the
    #: tensor type holding most bytes
    file_type: str | None
    n_layers: int
    n_ctx_train: int
    n_embd: int
    #: feed-forward width (largest layer); 0 when the file does not say
    n_ff: int
    n_head: int
    #: largest KV head count over layers; grouped-query attention when < n_head
    n_head_kv: int
    #: KV heads of each layer: some files store a per-layer array, 0 = no KV cache
    layer_n_head_kv: tuple[int, ...]
    head_dim_k: int
    head_dim_v: int
    #: K/V head size on sliding-window layers (gemma4 stores its own)
    head_dim_k_swa: int
    head_dim_v_swa: int
    #: attention window of sliding-window layers; 0 when the model has none
    sliding_window: int
    #: per layer: True where the layer uses the sliding window
    swa_layers: tuple[bool, ...]
    n_vocab: int
    n_expert: int
    n_expert_used: int
    n_ff_expert: int
    #: True for multi-head latent attention (DeepSeek-style): V lives inside K
    mla: bool
    tensor_count: int
    tensor_bytes: int
    #: bytes of ``blk.N.*`` tensors, indexed by N
    layer_tensor_bytes: tuple[int, ...]
    #: bytes of tensors that always stay in host memory (token_embd and friends)
    input_tensor_bytes: int
    #: bytes of the output head (output, output_norm): offloaded with the output layer
    output_tensor_bytes: int
    #: no ``output.weight``: llama.cpp reuses token_embd as the output head and copies
    #: it to the device when the output layer is offloaded
    tied_embeddings: bool
    #: bytes before the tensor data (metadata, vocabulary)
    header_bytes: int
    #: weights: the elements of every tensor in this file (one part of a split model)
    n_params: int = 0
    #: bytes of ``blk.N.*`` matrices the CPU backend repacks into a buffer of its own
    #: (see :data:`procman.models.gguf.REPACKED_TYPES`), indexed by N
    layer_repack_bytes: tuple[int, ...] = ()
    #: bytes of the output head the CPU backend repacks (a tied token_embd counts:
    #: the output layer gets its own copy while the input keeps the mapped one)
    output_repack_bytes: int = 0

    @property
    def head_dim(self) -> int:
        return self.head_dim_k

    @property
    def gqa(self) -> bool:
        """Grouped-query attention: fewer KV heads than query heads."""
        return 0 < self.n_head_kv < self.n_head

    @property
    def n_swa_layers(self) -> int:
        return sum(self.swa_layers)
