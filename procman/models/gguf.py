"""Validate a GGUF model file and read what memory estimation needs from it.

``validate_model`` answers two questions before any server is spawned: will
llama-server accept this file at all, and what shape is the model (layers,
heads, context, per-layer tensor bytes)? A bad file must produce one
:class:`~procman.errors.ModelError` with a hint, never a traceback from
numpy deep inside the reader, so the seam to ``gguf`` is guarded here.

Reading stays cheap: the header is parsed through a memory map and tensor
data is never touched. ``gguf.GGUFReader`` builds one numpy view per array
element, which makes a 49k-token vocabulary cost ~2 s; :class:`_HeaderReader`
skips large string arrays (only their length is needed) and reads numeric
arrays in one view, which brings that to ~20 ms. Results are memoised per
file identity (path, device, inode, size, mtime, ctime) because the
supervisor validates the same file on every spawn, and recorded on disk
(:mod:`procman.models._info_cache`) so that a later process skips the
``gguf``/numpy import for a file it has seen.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from procman.errors import ModelError
from procman.models import _info_cache
from procman.models.info import ModelInfo

if TYPE_CHECKING:
    import gguf
    import numpy.typing as npt

__all__ = ["REPACKED_TYPES", "ModelInfo", "validate_model"]

_GGUF_MAGIC = b"GGUF"
#: llama.cpp b11312 reads v2 and v3 (v1 was dropped long ago); gguf-py agrees
_SUPPORTED_VERSIONS = (2, 3)
#: string arrays longer than this (vocabularies, merges) are skipped, not decoded
_LAZY_ARRAY_MIN = 256
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.")
#: tensors llama.cpp places with the *output* layer (dev_output), not the input
_OUTPUT_TENSORS = frozenset(
    {"output.weight", "output.bias", "output_norm.weight", "output_norm.bias"}
)

#: tensor types ggml's CPU backend copies into a ``CPU_REPACK`` buffer (interleaved rows
#: for its int8 kernels) when a matrix multiplication uses them and the row count is a
#: multiple of 8: ggml/src/ggml-cpu/repack.cpp ``ggml_repack_get_optimal_repack_type``
#: at b11312 on x86-64 (Q4_0, Q4_K, IQ4_NL, MXFP4 with AVX2; Q2_K with AVX-512). ARM
#: with i8mm repacks Q5_K, Q6_K and Q8_0 as well; they are not counted here.
REPACKED_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4", "Q2_K"})
_REPACK_ROWS = 8

#: (default pattern period, dense_first, default window) for architectures whose
#: sliding-window layout is hard-coded in llama.cpp b11312 src/models/*.cpp when
#: the file carries no ``sliding_window_pattern``; a window of 0 means "only if
#: ``sliding_window`` is in the file".
_SWA_DEFAULTS: dict[str, tuple[int, bool, int]] = {
    "gemma2": (2, False, 4096), "gemma3": (6, False, 0), "gemma3n": (5, False, 0),
    "gemma-embedding": (6, False, 0), "cohere2": (4, False, 0), "cohere2moe": (4, True, 0),
    "gpt-oss": (2, False, 0), "llama4": (4, False, 8192), "olmo2": (4, False, 0),
    "exaone4": (4, False, 0), "exaone-moe": (4, False, 0), "smallthinker": (4, True, 0),
    "afmoe": (4, False, 0), "mellum": (4, False, 0), "plamo3": (8, False, 0),
    "laguna": (4, True, 0), "modern-bert": (3, True, 0), "muse-glimmer": (4, False, 0),
    "phi3": (1, False, 0),
}  # fmt: skip


def validate_model(path: str | os.PathLike[str]) -> ModelInfo:
    """Check that *path* is a GGUF model llama-server can load; describe it.

    Raises :class:`ModelError` (with a hint) for a missing file, a directory,
    an unreadable file, another format, an unsupported GGUF version, a
    truncated file or a header without an architecture.
    """
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError as exc:
        raise ModelError(
            f"model file not found: {p}",
            hint="check the path, or use `demo` for the bundled demo model",
        ) from exc
    except PermissionError as exc:
        raise ModelError(
            f"cannot access model file {p}: permission denied",
            hint="check the permissions of the file and its folders",
        ) from exc
    if stat.S_ISDIR(st.st_mode):
        found = sorted(q.name for q in p.glob("*.gguf"))[:3]
        hint = (
            f"pass the .gguf file inside it, e.g. {p / found[0]}"
            if found
            else "pass the path of a .gguf file"
        )
        raise ModelError(f"model path is a directory, not a GGUF file: {p}", hint=hint)
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(f"model path is not a regular file: {p}", hint="pass a .gguf file")
    resolved = p.resolve()
    return _validate_cached(resolved, _info_cache.file_key(resolved, st))


@functools.lru_cache(maxsize=64)
def _validate_cached(path: Path, key: _info_cache.FileKey) -> ModelInfo:
    if (known := _info_cache.lookup(key)) is not None:
        return known
    size = key[3]
    head = _read_head(path)
    _check_head(path, head, size)
    version = struct.unpack_from("<I", head, 4)[0]
    try:
        info = _describe(path, size, version, _open_reader(path))
    except ModelError:
        raise
    except Exception as exc:  # any reader failure is a bad file, never a traceback
        # the reader reports a short file as a reshape/index failure deep in numpy;
        # a well-formed header that runs past the end is the common cause
        raise ModelError(
            f"{path} is truncated or corrupt ({size} bytes; GGUF reader: {exc!r:.200})",
            hint="download it again and compare its sha256 with the publisher's",
        ) from exc
    _info_cache.remember(key, info)
    return info


def _read_head(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(64)
    except PermissionError as exc:
        raise ModelError(
            f"cannot read model file {path}: permission denied",
            hint=f"make it readable by this user (chmod u+r {path})",
        ) from exc
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror or exc}") from exc


def _check_head(path: Path, head: bytes, size: int) -> None:
    if len(head) < 8:
        raise ModelError(
            f"{path} is not a GGUF model: only {size} bytes long",
            hint="the file is empty or truncated; download it again",
        )
    if head[:4] != _GGUF_MAGIC:
        what, hint = _identify(head)
        raise ModelError(f"{path} is not a GGUF model: {what}", hint=hint)
    version = struct.unpack_from("<I", head, 4)[0]
    if version and version & 0xFFFF == 0:  # written on a big-endian machine
        raise ModelError(
            f"{path} is a big-endian GGUF file",
            hint="llama.cpp on this machine needs a little-endian GGUF; use the standard build",
        )
    if version not in _SUPPORTED_VERSIONS:
        newer = version > max(_SUPPORTED_VERSIONS)
        raise ModelError(
            f"{path} uses GGUF version {version}; llama.cpp b11312 reads versions "
            f"{_SUPPORTED_VERSIONS[0]}-{_SUPPORTED_VERSIONS[-1]}",
            hint="upgrade llamactl and its llama.cpp build"
            if newer
            else "re-convert the model with a current llama.cpp (convert_hf_to_gguf.py)",
        )


_CONVERT = "convert it with llama.cpp's convert_hf_to_gguf.py, or download a .gguf build"
_LEGACY_MAGICS = (b"lmgg", b"fmgg", b"tjgg", b"algg", b"ggml", b"ggmf", b"ggjt")


def _identify(head: bytes) -> tuple[str, str]:
    """Name the format a non-GGUF file most likely is, with what to do about it."""
    known = (  # first match wins
        (head.startswith(b"PK\x03\x04"), "it is a zip archive (a PyTorch checkpoint or a wheel?)",
         "if it contains a .gguf file, extract it; otherwise " + _CONVERT),
        (head[:4] in _LEGACY_MAGICS, "it is a legacy GGML/GGJT file",
         "re-convert it to GGUF; llama.cpp no longer reads GGML"),
        (head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 32,
         "it looks like safetensors (Hugging Face weights)", _CONVERT),
        (head.startswith(b"version https://git-lfs"), "it is a Git LFS pointer, not the weights",
         "run `git lfs pull` in its repository"),
        (head.lstrip()[:1] == b"<", "it is an HTML/XML page (a failed download?)",
         "download the file again"),
        (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05",
         "it is a Python pickle (PyTorch weights?)", _CONVERT),
        (all(b >= 32 or b in b"\t\n\r" for b in head), "it is a text file",
         "pass the .gguf model file itself"),
    )  # fmt: skip
    for matches, what, hint in known:
        if matches:
            return what, hint
    return f"unknown format (starts with {head[:8].hex(' ')})", _CONVERT


def _open_reader(path: Path) -> gguf.GGUFReader:
    try:
        return _header_reader_class()(path)
    except PermissionError as exc:
        raise ModelError(f"cannot read model file {path}: permission denied") from exc
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror or exc}") from exc


_Parts = tuple[int, list["npt.NDArray[Any]"], list[int], list["gguf.GGUFValueType"]]
#: arrays of arrays in metadata (real models nest none); deeper is a corrupt or crafted file
_MAX_ARRAY_DEPTH = 8


@functools.cache
def _header_reader_class() -> type[gguf.GGUFReader]:
    """Build the reader subclass lazily so that ``import procman`` stays fast."""
    import gguf  # speed
    import numpy as np  # speed

    array_t = gguf.GGUFValueType.ARRAY
    string_t = gguf.GGUFValueType.STRING
    u64 = struct.Struct("<Q").unpack_from

    class _HeaderReader(gguf.GGUFReader):
        """GGUFReader that does not decode big arrays element by element.

        Overrides ``_get_field_parts`` (internal to gguf-py, pinned by
        tests/unit/test_model_file.py against the stock reader): string arrays
        keep only their length, numeric arrays become a single view.
        """

        depth = 0

        def _get_field_parts(self, orig_offs: int, raw_type: int) -> _Parts:
            if raw_type != array_t:
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            n = int(alen[0])
            itype = gguf.GGUFValueType(int(raw_itype[0]))
            if itype == array_t:  # the stock reader recurses: a crafted file could exhaust it
                if self.depth >= _MAX_ARRAY_DEPTH:
                    raise ValueError(f"metadata arrays nested deeper than {_MAX_ARRAY_DEPTH}")
                self.depth += 1
                try:
                    return super()._get_field_parts(orig_offs, raw_type)
                finally:
                    self.depth -= 1
            types = [array_t, itype]
            offs = orig_offs + 12
            if itype == string_t and n >= _LAZY_ARRAY_MIN:
                buf = self.data.data
                for _ in range(n):
                    offs += 8 + u64(buf, offs)[0]
                if offs > len(buf):
                    raise IndexError("string array runs past the end of the file")
                return offs - orig_offs, [raw_itype, alen], [], types
            np_type = self.gguf_scalar_to_np.get(itype)
            if np_type is None:
                return super()._get_field_parts(orig_offs, raw_type)
            values = self._get(offs, np_type, n)
            if len(values) != n:
                raise IndexError("array runs past the end of the file")
            return 12 + int(values.nbytes), [raw_itype, alen, values], [2], types

    return _HeaderReader


def _describe(path: Path, size: int, version: int, reader: gguf.GGUFReader) -> ModelInfo:
    fields: dict[str, Any] = dict(reader.fields)
    arch = _value(fields, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelError(
            f"{path} has no general.architecture key",
            hint="the file is not a complete model; re-convert it with llama.cpp",
        )
    if arch == "clip":
        raise ModelError(
            f"{path} is a multimodal projector (architecture 'clip'), not a language model",
            hint="pass it with --mmproj next to the language model",
        )
    tensors = list(reader.tensors)
    if not tensors:
        raise ModelError(
            f"{path} holds no tensors (a vocabulary-only file?)",
            hint="pass a model file with weights",
        )
    _check_end(path, tensors, size)
    for part in _split_parts(path, _as_int(_value(fields, "split.count"))):
        part_size, part_tensors = _read_part(part)
        _check_end(part, part_tensors, part_size)
        tensors += part_tensors
        size += part_size

    def key(name: str) -> Any:
        return _value(fields, f"{arch}.{name}")

    n_layers = _require_int(path, arch, key("block_count"), "block_count")
    n_embd = _require_int(path, arch, key("embedding_length"), "embedding_length")
    n_ctx_train = _require_int(path, arch, key("context_length"), "context_length")
    n_head = _max_int(key("attention.head_count"))
    heads_kv = _per_layer(key("attention.head_count_kv"), n_layers, default=n_head)
    n_kv_shared = _as_int(key("attention.shared_kv_layers"))
    if n_kv_shared:  # the last layers reuse earlier caches (gemma3n/gemma4)
        keep = max(n_layers - n_kv_shared, 0)
        heads_kv = heads_kv[:keep] + (0,) * (n_layers - keep)
    default_dim = n_embd // n_head if n_head else 0
    head_k = _as_int(key("attention.key_length")) or default_dim
    head_v = _as_int(key("attention.value_length")) or default_dim
    swa_window, swa_layers = _swa_layout(arch, n_layers, key)

    tally = _tally(tensors, n_layers)
    n_vocab = _as_int(key("vocab_size")) or _array_len(fields.get("tokenizer.ggml.tokens"))
    return ModelInfo(
        path=path,
        size_bytes=size,
        gguf_version=version,
        architecture=arch,
        name=_opt_str(_value(fields, "general.name")),
        file_type=_file_type(_value(fields, "general.file_type"), tally.types),
        n_layers=n_layers,
        n_ctx_train=n_ctx_train,
        n_embd=n_embd,
        n_ff=_max_int(key("feed_forward_length")),
        n_head=n_head,
        n_head_kv=max(heads_kv, default=0),
        layer_n_head_kv=heads_kv,
        head_dim_k=head_k,
        head_dim_v=head_v,
        head_dim_k_swa=_as_int(key("attention.key_length_swa")) or head_k,
        head_dim_v_swa=_as_int(key("attention.value_length_swa")) or head_v,
        sliding_window=swa_window,
        swa_layers=swa_layers,
        n_vocab=n_vocab,
        n_expert=_as_int(key("expert_count")),
        n_expert_used=_as_int(key("expert_used_count")),
        n_ff_expert=_max_int(key("expert_feed_forward_length")),
        mla=key("attention.key_length_mla") is not None,
        tensor_count=len(tensors),
        tensor_bytes=sum(tally.types.values()),
        layer_tensor_bytes=tuple(tally.layer_bytes),
        input_tensor_bytes=tally.input_bytes,
        output_tensor_bytes=tally.output_bytes,
        tied_embeddings=tally.tied,
        header_bytes=int(reader.data_offset),
        n_params=sum(int(t.n_elements) for t in tensors),
        layer_repack_bytes=tuple(tally.layer_repack),
        output_repack_bytes=tally.output_repack,
    )


@dataclass
class _Tally:
    """Tensor bytes by where they go: each layer, the input, the output head; and what of it
    the CPU backend repacks (see REPACKED_TYPES); bytes by tensor type."""

    layer_bytes: list[int]
    layer_repack: list[int]
    input_bytes: int = 0
    output_bytes: int = 0
    output_repack: int = 0
    tied: bool = False
    types: Counter[str] = field(default_factory=Counter)


def _tally(tensors: list[Any], n_layers: int) -> _Tally:
    tally = _Tally(layer_bytes=[0] * n_layers, layer_repack=[0] * n_layers)
    names = {t.name for t in tensors}
    tally.tied = "output.weight" not in names
    layer_bytes, layer_repack, types = tally.layer_bytes, tally.layer_repack, tally.types
    for t in tensors:
        n_bytes = int(t.n_bytes)
        types[t.tensor_type.name] += n_bytes
        repacked = (
            t.tensor_type.name in REPACKED_TYPES
            and len(t.shape) >= 2
            and int(t.shape[1]) % _REPACK_ROWS == 0
        )
        m = _BLOCK_TENSOR.match(t.name)
        if m:
            il = int(m.group(1))
            if il >= len(layer_bytes):
                layer_bytes.extend([0] * (il + 1 - len(layer_bytes)))
                layer_repack.extend([0] * (il + 1 - len(layer_repack)))
            layer_bytes[il] += n_bytes
            layer_repack[il] += n_bytes if repacked else 0
        elif t.name in _OUTPUT_TENSORS:
            tally.output_bytes += n_bytes
            tally.output_repack += n_bytes if repacked else 0
        else:
            tally.input_bytes += n_bytes
            if t.name == "token_embd.weight" and tally.tied and repacked:
                tally.output_repack += n_bytes
    return tally


def _check_end(path: Path, tensors: list[Any], size: int) -> None:
    data_end = max((int(t.data_offset) + int(t.n_bytes) for t in tensors), default=0)
    if data_end > size:
        raise ModelError(
            f"{path} is truncated: its tensors need {data_end} bytes, the file has {size}",
            hint="download it again and compare its sha256 with the publisher's",
        )


_FIRST_SPLIT = re.compile(r"-00001-of-(\d{5})\.gguf$")


def _split_parts(path: Path, count: int) -> list[Path]:
    """The other files of a split model (llama.cpp's ``PREFIX-0000i-of-0000N.gguf``), whose
    tensors count too: the first file holds the metadata and only some of the weights."""
    m = _FIRST_SPLIT.search(path.name)
    if count <= 1 or m is None:
        return []
    prefix = path.name[: m.start()]
    parts = [path.with_name(f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(2, count + 1)]
    if missing := [p.name for p in parts if not p.is_file()]:
        raise ModelError(
            f"{path} is part 1 of a {count}-part model, and {', '.join(missing)} is missing "
            f"beside it",
            hint="download every part into the same folder (llamactl pull fetches them all)",
        )
    return parts


def _read_part(part: Path) -> tuple[int, list[Any]]:
    try:
        return part.stat().st_size, list(_open_reader(part).tensors)
    except ModelError:
        raise
    except Exception as exc:  # as for the first part: a bad file, never a traceback
        raise ModelError(
            f"{part} is truncated or corrupt (GGUF reader: {exc!r:.200})",
            hint="download it again and compare its sha256 with the publisher's",
        ) from exc


def _swa_layout(arch: str, n_layers: int, key: Any) -> tuple[int, tuple[bool, ...]]:
    """Which layers use a sliding window, as llama.cpp's ``load_swa_pattern`` decides.

    A per-layer bool array in ``sliding_window_pattern`` wins; otherwise the
    period comes from the file or the architecture's default, and layer ``il``
    slides when ``il % period < period - 1`` (the last of each group is dense),
    or ``il % period != 0`` for dense-first architectures.
    """
    period, dense_first, window = _SWA_DEFAULTS.get(arch, (0, False, 0))
    window = _as_int(key("attention.sliding_window")) or window
    pattern = key("attention.sliding_window_pattern")
    none = (False,) * n_layers
    if window <= 0:
        return 0, none
    if isinstance(pattern, list):
        flags = tuple(bool(v) for v in pattern[:n_layers])
        return window, flags + (False,) * (n_layers - len(flags))
    if pattern is None and arch not in _SWA_DEFAULTS:
        return 0, none  # llama.cpp ignores the key for architectures without SWA support
    if pattern is not None:
        period = int(pattern)
    if period == 0:
        return window, (True,) * n_layers
    if dense_first:
        return window, tuple(il % period != 0 for il in range(n_layers))
    return window, tuple(il % period < period - 1 for il in range(n_layers))


def _value(fields: dict[str, Any], name: str) -> Any:
    """A field's value: scalar, str, or list for arrays; None when absent."""
    field = fields.get(name)
    if field is None:
        return None
    import gguf  # speed

    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
        if len(field.types) > 1 and field.types[-1] == gguf.GGUFValueType.STRING:
            return field.contents() if field.data else []
        return [v for idx in field.data for v in field.parts[idx].tolist()]
    return field.contents()


def _array_len(field: Any) -> int:
    """Element count of an array field without decoding it.

    A key/value field's parts are [key length, key, value type, item type,
    count, items...] (gguf-py ``_build_fields``).
    """
    if field is None or len(field.parts) < 5:
        return 0
    return int(field.parts[4][0])


def _as_int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _max_int(value: Any) -> int:
    if isinstance(value, list):
        return max((_as_int(v) for v in value), default=0)
    return _as_int(value)


def _per_layer(value: Any, n_layers: int, *, default: int) -> tuple[int, ...]:
    if isinstance(value, list):
        vals = tuple(_as_int(v) for v in value[:n_layers])
        return vals + (vals[-1] if vals else default,) * (n_layers - len(vals))
    return (_as_int(value) if value is not None else default,) * n_layers


def _require_int(path: Path, arch: str, value: Any, name: str) -> int:
    result = _max_int(value)
    if result <= 0:
        raise ModelError(
            f"{path} lacks {arch}.{name}; llama.cpp cannot load it",
            hint="the header is incomplete; re-convert the model with a current llama.cpp",
        )
    return result


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _file_type(value: Any, types: Counter[str]) -> str | None:
    import gguf  # speed

    if isinstance(value, int) and not isinstance(value, bool):
        try:
            name: str = gguf.LlamaFileType(value).name
        except ValueError:
            return f"type {value}"
        return "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")
    if types:
        return types.most_common(1)[0][0]
    return None
