"""What llamactl itself downloaded into the Hugging Face cache, so that only that is removed.

The cache is shared with every other tool that uses ``huggingface_hub``; a
model the user fetched with ``hf download`` or transformers is theirs.
``<home>/pulled.json`` lists the pulls that fetched bytes: the reference, the
repository, the commit, the files and their blobs. ``llamactl models rm``
removes only what is listed there, and a blob only when no snapshot of
another revision still links to it. Writers hold ``<home>/pulled.lock`` so
that concurrent pulls do not lose each other's record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from buildtools.paths import home, write_json_atomic

if TYPE_CHECKING:
    from procman.models.pull import Pulled

__all__ = ["Record", "forget", "load", "record", "remove_files"]

Record = dict[str, Any]


def _path() -> Path:
    return home() / "pulled.json"


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    lock = home() / "pulled.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def load() -> list[Record]:
    """The records, oldest first; an unreadable file reads as none (it is rewritten)."""
    try:
        doc = json.loads(_path().read_text())
    except (OSError, ValueError):
        return []
    models = doc.get("models") if isinstance(doc, dict) else None
    return [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []


def record(pulled: Pulled, cache: Path, *, etags: list[str]) -> None:
    """Add (or refresh) the record of a pull that fetched bytes."""
    entry: Record = {
        "ref": pulled.ref,
        "repo_id": pulled.repo_id,
        "commit": pulled.commit,
        "files": list(pulled.files),
        "etags": etags,
        "cache": str(cache),
        "path": str(pulled.path),
        "size_bytes": pulled.size_bytes,
        "time": time.time(),
    }
    with _locked():
        kept = [m for m in load() if m.get("path") != entry["path"]]
        write_json_atomic(_path(), {"models": [*kept, entry]})


def forget(entry: Record) -> None:
    with _locked():
        kept = [m for m in load() if m.get("path") != entry.get("path")]
        write_json_atomic(_path(), {"models": kept})


def remove_files(entry: Record) -> int:
    """Delete a pull's snapshot links, and its blobs no other snapshot uses; returns bytes freed."""
    cache = Path(entry["cache"])
    storage = cache / f"models--{str(entry['repo_id']).replace('/', '--')}"
    snapshot = storage / "snapshots" / str(entry["commit"])
    for name in entry.get("files", []):
        with contextlib.suppress(FileNotFoundError):
            (snapshot / name).unlink()
    still_used = {
        os.path.realpath(link) for link in (storage / "snapshots").rglob("*") if link.is_symlink()
    }
    freed = 0
    for etag in entry.get("etags", []):
        blob = storage / "blobs" / str(etag)
        if str(blob.resolve()) in still_used or not blob.is_file():
            continue
        freed += blob.stat().st_size
        blob.unlink()
    _prune(snapshot, stop=storage)
    return freed


def _prune(folder: Path, *, stop: Path) -> None:
    """Remove ``folder`` and its parents up to ``stop`` while they are empty."""
    inner = sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for path in [*inner, folder]:
        with contextlib.suppress(OSError):
            path.rmdir()
    parent = folder.parent
    while parent != stop and parent.is_relative_to(stop):
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent
