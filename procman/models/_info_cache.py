"""Remember, across processes, what a model file's header said.

Reading a GGUF header means importing ``gguf`` and numpy (~100-200 ms on
these machines) before the header is even opened, and ``llamactl serve``
validates its model before it spawns anything: that import alone was the
largest single cost between launch and first answer. The result for a file
depends only on its bytes, so it is stored in ``<home>/model-info.json``
keyed by what identifies those bytes without reading them: the resolved
path, device, inode, size, and both mtime and ctime in nanoseconds (ctime
cannot be set by tools that preserve mtime, so an in-place rewrite is never
mistaken for the old file). Only successful validations are recorded: a bad
file is read, and reported, every time.

The store is advisory: unreadable, corrupt or stale entries are ignored and
rewritten; writes go through a temporary file and ``os.replace`` so that
concurrent ``serve`` processes never see half a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from buildtools.paths import home, write_json_atomic
from procman.models.info import ModelInfo

__all__ = ["FileKey", "file_key", "lookup", "remember"]

#: entries kept; the oldest go first
MAX_ENTRIES = 64
#: bump when ``_describe`` reads a field differently: old records are then ignored
FORMAT = 1

FileKey = tuple[str, int, int, int, int, int]


def file_key(path: Path, st: os.stat_result) -> FileKey:
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def store_path() -> Path:
    return home() / "model-info.json"


def _schema() -> list[Any]:
    return [FORMAT, *(f.name for f in dataclasses.fields(ModelInfo))]


def _load() -> dict[str, Any]:
    try:
        doc = json.loads(store_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("schema") != _schema():
        return {}
    entries = doc.get("entries")
    return entries if isinstance(entries, dict) else {}


def lookup(key: FileKey) -> ModelInfo | None:
    """The recorded description of the file with this identity, if any."""
    entry = _load().get(json.dumps(key))
    if not isinstance(entry, dict):
        return None
    try:
        return ModelInfo(
            **{
                **entry,
                "path": Path(entry["path"]),
                **{k: tuple(entry[k]) for k in _TUPLES},
            }
        )
    except (TypeError, KeyError):
        return None


_TUPLES = ("layer_n_head_kv", "swa_layers", "layer_tensor_bytes", "layer_repack_bytes")


def remember(key: FileKey, info: ModelInfo) -> None:
    """Record *info* for *key*; failures to write are ignored (the store is a cache)."""
    entries, name = _load(), json.dumps(key)
    entries.pop(name, None)  # re-inserted last: the oldest entries are dropped first
    entries[name] = dataclasses.asdict(info) | {"path": str(info.path)}
    while len(entries) > MAX_ENTRIES:
        del entries[next(iter(entries))]
    with contextlib.suppress(OSError):
        write_json_atomic(store_path(), {"schema": _schema(), "entries": entries})
