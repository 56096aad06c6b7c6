"""Write a smaller copy of a GGUF model that keeps only its first N layers.

The device machine (the GPU one) can be sent at most 64 MiB and cannot
download anything, so the demo model (98 MB) does not travel whole. This keeps
its real tokenizer, architecture and quantised tensors, with fewer repeating
blocks: llama.cpp loads and runs it like any model (its text is nonsense),
which is all the CUDA checks need: offload, VRAM metering, tokens per second.

    python tests/device/shrink_gguf.py IN.gguf OUT.gguf --layers 8
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf

_BLOCK = re.compile(r"^blk\.(\d+)\.")


def shrink(
    src: Path,
    dest: Path,
    layers: int | None = None,
    *,
    extra: Mapping[str, tuple[Any, gguf.GGUFValueType]] | None = None,
) -> int:
    """Copy ``src`` to ``dest`` with blocks ``0..layers-1`` only (None: all), metadata
    ``extra`` (key -> value, type) added or replaced; returns bytes written."""
    reader = gguf.GGUFReader(src)
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    count_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    have = int(reader.fields[count_key].contents())
    layers = have if layers is None else layers
    if not 0 < layers <= have:
        raise SystemExit(f"{src} has {have} layers; --layers must be 1..{have}")
    extra = dict(extra or {})
    writer = gguf.GGUFWriter(dest, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name in extra:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = layers if field.name == count_key else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for key, (value, kind) in extra.items():
        writer.add_key_value(key, value, kind)
    kept = [
        t for t in reader.tensors if (m := _BLOCK.match(t.name)) is None or int(m.group(1)) < layers
    ]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return dest.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    size = shrink(args.src, args.dest, args.layers)
    print(f"{args.dest}: {size:,} bytes, {args.layers} layers")


if __name__ == "__main__":
    main()
