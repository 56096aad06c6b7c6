"""validate_model on tiny synthetic GGUF files written with gguf-py's own writer."""

from __future__ import annotations

import os
import shutil
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import gguf
import numpy as np
import pytest

from procman.errors import ModelError
from procman.models.gguf import ModelInfo, validate_model

F16_BYTES = 2


def write_model(
    path: Path,
    *,
    arch: str = "llama",
    n_layers: int = 2,
    n_embd: int = 64,
    n_ff: int = 128,
    n_head: int = 4,
    n_head_kv: int | Sequence[int] = 4,
    head_dim: int | None = None,
    n_vocab: int = 300,
    ctx_train: int = 2048,
    sliding_window: int = 0,
    swa_pattern: int | Sequence[bool] | None = None,
    tied: bool = True,
    with_tensors: bool = True,
    edit: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    """A structurally valid model: llama-style tensors with random f16 weights.

    ``n_vocab`` above 256 exercises the reader's lazy string arrays.
    """
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny {arch}")
    w.add_block_count(n_layers)
    w.add_context_length(ctx_train)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    if isinstance(n_head_kv, int):
        w.add_head_count_kv(n_head_kv)
    else:
        w.add_array(f"{arch}.attention.head_count_kv", list(n_head_kv))
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if sliding_window:
        w.add_sliding_window(sliding_window)
    if isinstance(swa_pattern, int):
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", swa_pattern)
    elif swa_pattern is not None:
        w.add_array(f"{arch}.attention.sliding_window_pattern", [bool(v) for v in swa_pattern])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(n_vocab)])
    w.add_token_types([1] * n_vocab)
    if edit is not None:
        edit(w)

    def t(*shape: int) -> np.ndarray[Any, Any]:
        return rng.standard_normal(shape).astype(np.float16)

    if with_tensors:
        dim = head_dim or n_embd // n_head
        kv = max([n_head_kv] if isinstance(n_head_kv, int) else n_head_kv) * dim
        w.add_tensor("token_embd.weight", t(n_vocab, n_embd))
        w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
        if not tied:
            w.add_tensor("output.weight", t(n_vocab, n_embd))
        for i in range(n_layers):
            w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
            w.add_tensor(f"blk.{i}.attn_q.weight", t(n_head * dim, n_embd))
            w.add_tensor(f"blk.{i}.attn_k.weight", t(kv, n_embd))
            w.add_tensor(f"blk.{i}.attn_v.weight", t(kv, n_embd))
            w.add_tensor(f"blk.{i}.attn_output.weight", t(n_embd, n_head * dim))
            w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
            w.add_tensor(f"blk.{i}.ffn_gate.weight", t(n_ff, n_embd))
            w.add_tensor(f"blk.{i}.ffn_up.weight", t(n_ff, n_embd))
            w.add_tensor(f"blk.{i}.ffn_down.weight", t(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def layer_bytes(n_embd: int, n_ff: int, q_dim: int, kv_dim: int) -> int:
    f16 = F16_BYTES * (2 * q_dim * n_embd + 2 * kv_dim * n_embd + 3 * n_ff * n_embd)
    return f16 + 2 * 4 * n_embd  # two f32 norms


# -- what it reads ---------------------------------------------------------------------------


def test_reads_llama_with_grouped_query_attention(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", n_layers=3, n_head=8, n_head_kv=2)
    info = validate_model(path)

    assert isinstance(info, ModelInfo)
    assert info.path == path.resolve()
    assert info.size_bytes == path.stat().st_size
    assert (info.architecture, info.name, info.file_type) == ("llama", "tiny llama", "F16")
    assert (info.n_layers, info.n_ctx_train, info.n_embd, info.n_ff) == (3, 2048, 64, 128)
    assert (info.n_head, info.n_head_kv, info.head_dim) == (8, 2, 8)
    assert info.gqa
    assert info.layer_n_head_kv == (2, 2, 2)
    assert info.n_vocab == 300  # no llama.vocab_size key: counted from the token list
    assert info.sliding_window == 0
    assert info.n_swa_layers == 0
    assert info.gguf_version == 3
    per_layer = layer_bytes(64, 128, q_dim=64, kv_dim=16)
    assert info.layer_tensor_bytes == (per_layer,) * 3
    assert info.input_tensor_bytes == 300 * 64 * F16_BYTES
    assert info.output_tensor_bytes == 64 * 4  # output_norm only: the head is tied
    assert info.tied_embeddings
    assert info.tensor_count == 2 + 9 * 3
    assert info.tensor_bytes == 3 * per_layer + info.input_tensor_bytes + 64 * 4
    assert 0 < info.header_bytes < info.size_bytes


def test_untied_output_head_counts_with_the_output_layer(tmp_path: Path) -> None:
    info = validate_model(write_model(tmp_path / "m.gguf", tied=False))
    assert not info.tied_embeddings
    assert info.output_tensor_bytes == 300 * 64 * F16_BYTES + 64 * 4


def test_key_length_overrides_the_derived_head_size(tmp_path: Path) -> None:
    info = validate_model(write_model(tmp_path / "m.gguf", n_head=4, head_dim=32))
    assert (info.head_dim_k, info.head_dim_v) == (32, 32)
    assert (info.head_dim_k_swa, info.head_dim_v_swa) == (32, 32)


def test_per_layer_kv_head_counts(tmp_path: Path) -> None:
    info = validate_model(write_model(tmp_path / "m.gguf", n_layers=3, n_head_kv=[4, 0, 2]))
    assert info.layer_n_head_kv == (4, 0, 2)
    assert info.n_head_kv == 4


def test_gemma3_uses_its_default_pattern_of_six(tmp_path: Path) -> None:
    path = write_model(tmp_path / "g.gguf", arch="gemma3", n_layers=12, sliding_window=512)
    info = validate_model(path)
    assert info.sliding_window == 512
    dense = [il for il, swa in enumerate(info.swa_layers) if not swa]
    assert dense == [5, 11]  # llama.cpp: il % 6 < 5 slides
    assert info.n_swa_layers == 10


def test_gemma3_without_a_window_has_no_sliding_layers(tmp_path: Path) -> None:
    info = validate_model(write_model(tmp_path / "g.gguf", arch="gemma3", n_layers=6))
    assert info.sliding_window == 0
    assert not any(info.swa_layers)


def test_gemma2_slides_every_other_layer_with_its_default_window(tmp_path: Path) -> None:
    info = validate_model(write_model(tmp_path / "g.gguf", arch="gemma2", n_layers=4))
    assert info.sliding_window == 4096
    assert info.swa_layers == (True, False, True, False)


def test_pattern_from_the_file_wins(tmp_path: Path) -> None:
    path = write_model(
        tmp_path / "a.gguf", arch="gemma3", n_layers=4, sliding_window=128, swa_pattern=2
    )
    assert validate_model(path).swa_layers == (True, False, True, False)
    flags = [False, True, True, False]
    path = write_model(
        tmp_path / "b.gguf", arch="gemma4", n_layers=4, sliding_window=128, swa_pattern=flags
    )
    assert validate_model(path).swa_layers == tuple(flags)


def test_dense_first_architectures(tmp_path: Path) -> None:
    path = write_model(tmp_path / "c.gguf", arch="cohere2moe", n_layers=5, sliding_window=64)
    assert validate_model(path).swa_layers == (False, True, True, True, False)


def test_window_key_is_ignored_where_llama_cpp_ignores_it(tmp_path: Path) -> None:
    info = validate_model(write_model(tmp_path / "m.gguf", sliding_window=4096))
    assert info.sliding_window == 0  # llama.cpp's llama arch never reads the key


def test_fast_reader_agrees_with_the_stock_reader(tmp_path: Path) -> None:
    """Pins the ``_get_field_parts`` override to gguf-py's own parsing."""
    from procman.models.gguf import _header_reader_class

    path = write_model(tmp_path / "m.gguf", n_head_kv=[4, 2])
    fast, stock = _header_reader_class()(path), gguf.GGUFReader(path)
    assert list(fast.fields) == list(stock.fields)
    assert fast.data_offset == stock.data_offset
    for a, b in zip(fast.tensors, stock.tensors, strict=True):
        assert (a.name, a.tensor_type, a.n_bytes, a.data_offset) == (
            b.name,
            b.tensor_type,
            b.n_bytes,
            b.data_offset,
        )
    for name in ("llama.attention.head_count_kv", "tokenizer.ggml.token_type", "general.name"):
        assert fast.fields[name].contents() == stock.fields[name].contents()


def test_results_are_memoised_until_the_file_changes(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf")
    first = validate_model(path)
    assert validate_model(str(path)) is first
    write_model(path, n_layers=3)
    os.utime(path, ns=(1, 1))
    assert validate_model(path).n_layers == 3


# -- what it refuses -------------------------------------------------------------------------


def refuse(path: Path) -> ModelError:
    with pytest.raises(ModelError) as exc_info:
        validate_model(path)
    err = exc_info.value
    assert err.message
    assert err.hint
    return err


def test_missing_file(tmp_path: Path) -> None:
    err = refuse(tmp_path / "nope.gguf")
    assert "not found" in err.message


def test_directory_points_at_the_gguf_inside(tmp_path: Path) -> None:
    write_model(tmp_path / "inside.gguf")
    err = refuse(tmp_path)
    assert "directory" in err.message
    assert err.hint is not None
    assert "inside.gguf" in err.hint


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_model(tmp_path / "m.gguf")
    real_open = Path.open

    def deny(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.name == "m.gguf":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    # chmod is no test when the suite runs as root, so the refusal is simulated
    monkeypatch.setattr(Path, "open", deny)
    err = refuse(path)
    assert "permission denied" in err.message
    assert err.hint is not None
    assert "chmod" in err.hint


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "bytes long"),
        (b"hello, this is a plain text file\n" * 4, "text file"),
        (struct.pack("<Q", 120) + b'{"__metadata__": {}}' + b"\0" * 64, "safetensors"),
        (b"PK\x03\x04" + b"\0" * 60, "zip archive"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n", "Git LFS"),
        (b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
        (b"tjgg" + b"\0" * 60, "legacy GGML"),
        (b"\x80\x02}q\x00" + b"\x01" * 60, "pickle"),
        (bytes(range(1, 64)), "unknown format"),
    ],
)
def test_not_gguf(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    err = refuse(path)
    assert expected in err.message


@pytest.mark.parametrize(("version", "expected"), [(1, "re-convert"), (99, "upgrade")])
def test_unsupported_version(tmp_path: Path, version: int, expected: str) -> None:
    path = write_model(tmp_path / "m.gguf")
    with path.open("r+b") as f:
        f.seek(4)
        f.write(struct.pack("<I", version))
    err = refuse(path)
    assert f"version {version}" in err.message
    assert err.hint is not None
    assert expected in err.hint


def test_big_endian_file(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf")
    with path.open("r+b") as f:
        f.seek(4)
        f.write(struct.pack(">I", 3))
    assert "big-endian" in refuse(path).message


@pytest.mark.parametrize("keep", [0.5, 0.99, 24, 200])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    whole = write_model(tmp_path / "whole.gguf")
    size = whole.stat().st_size
    n = int(size * keep) if keep < 1 else int(keep)
    path = tmp_path / "cut.gguf"
    with whole.open("rb") as src, path.open("wb") as dst:
        dst.write(src.read(n))
    err = refuse(path)
    assert "truncated" in err.message


def test_truncated_copy_of_the_whole_file_is_fine(tmp_path: Path) -> None:
    whole = write_model(tmp_path / "whole.gguf")
    shutil.copy(whole, tmp_path / "copy.gguf")
    assert validate_model(tmp_path / "copy.gguf").n_layers == 2


def test_missing_architecture(tmp_path: Path) -> None:
    def drop(w: gguf.GGUFWriter) -> None:
        del w.kv_data[0]["general.architecture"]

    err = refuse(write_model(tmp_path / "m.gguf", edit=drop))
    assert "general.architecture" in err.message


def test_missing_block_count(tmp_path: Path) -> None:
    def drop(w: gguf.GGUFWriter) -> None:
        del w.kv_data[0]["llama.block_count"]

    assert "llama.block_count" in refuse(write_model(tmp_path / "m.gguf", edit=drop)).message


def test_vocabulary_only_file(tmp_path: Path) -> None:
    err = refuse(write_model(tmp_path / "v.gguf", with_tensors=False))
    assert "no tensors" in err.message


def test_multimodal_projector(tmp_path: Path) -> None:
    err = refuse(write_model(tmp_path / "mmproj.gguf", arch="clip"))
    assert "projector" in err.message
    assert err.hint is not None
    assert "--mmproj" in err.hint


def test_a_later_process_reuses_the_recorded_description(tmp_path: Path) -> None:
    from procman.models.gguf import _validate_cached

    path = write_model(tmp_path / "m.gguf", n_layers=3)
    first = validate_model(path)
    _validate_cached.cache_clear()  # what a new process starts with
    with mock.patch("procman.models.gguf._open_reader", side_effect=AssertionError("read")):
        again = validate_model(path)
    assert again == first and again is not first


def test_a_rewritten_file_is_read_again_even_with_its_old_mtime(tmp_path: Path) -> None:
    from procman.models.gguf import _validate_cached

    path = write_model(tmp_path / "m.gguf", ctx_train=2048)
    assert validate_model(path).n_ctx_train == 2048
    before = path.stat()
    other = write_model(tmp_path / "other.gguf", ctx_train=4096)
    with path.open("r+b") as f:  # same inode, same size, new bytes ...
        f.write(other.read_bytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # ... and the old mtime
    while path.stat().st_ctime_ns == before.st_ctime_ns:  # ctime ticks coarsely (a jiffy)
        time.sleep(0.005)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    _validate_cached.cache_clear()
    assert validate_model(path).n_ctx_train == 4096


def test_a_corrupt_record_store_is_ignored(tmp_path: Path) -> None:
    from procman.models import _info_cache
    from procman.models.gguf import _validate_cached

    path = write_model(tmp_path / "m.gguf", n_layers=3)
    validate_model(path)
    _info_cache.store_path().write_text("{not json")
    _validate_cached.cache_clear()
    assert validate_model(path).n_layers == 3
    assert _info_cache.lookup(_info_cache.file_key(path.resolve(), path.stat())) is not None


def test_a_bad_file_is_never_recorded(tmp_path: Path) -> None:
    from procman.models import _info_cache

    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ModelError):
        validate_model(path)
    assert not _info_cache.store_path().exists()
