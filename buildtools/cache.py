"""The content-addressed build cache.

Layout under the llamactl home::

    builds/<key>/bin/llama-server   a verified build, immutable once published
    builds/<key>/manifest.json      written last: no manifest, no build
    builds/.<key>.lock              flock held while <key> is being built
    work/<key>/                     the cmake build tree, kept for incremental rebuilds

A build becomes visible only by an atomic rename of a fully staged and
verified directory, so an interrupted or failed build can never be taken
from the cache as usable.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from buildtools.cancel import CancelToken
from buildtools.errors import CacheError

__all__ = ["BuildCache", "CachedBuild"]

MANIFEST = "manifest.json"
#: seconds between tries of a build lock held by another builder, when the wait is cancellable
_LOCK_RETRY = 0.25


@dataclass(frozen=True, kw_only=True)
class CachedBuild:
    """A published, verified build."""

    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def binary(self) -> Path:
        return self.path / "bin" / "llama-server"

    @property
    def bench_binary(self) -> Path:
        return self.path / "bin" / "llama-bench"

    @property
    def rpc_worker(self) -> Path:
        """``ggml-rpc-server``: lends this machine's devices to another's llama-server."""
        return self.path / "bin" / "ggml-rpc-server"

    @property
    def fit_params(self) -> Path:
        """``llama-fit-params``: llama.cpp's own dry-run memory fit."""
        return self.path / "bin" / "llama-fit-params"

    @property
    def rpc_protocol(self) -> str | None:
        """The RPC protocol version the worker announced when verified, if it was."""
        rpc = self.manifest.get("rpc") or {}
        return str(rpc["protocol"]) if rpc.get("protocol") else None

    @property
    def created(self) -> float:
        return float(self.manifest.get("created", 0.0))

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", "unknown"))

    @property
    def backend(self) -> str:
        return str(self.manifest.get("plan", {}).get("backend", "cpu"))

    @property
    def portable(self) -> bool:
        defines = self.manifest.get("plan", {}).get("cmake_defines", {})
        return bool(defines.get("GGML_BACKEND_DL") == "ON")

    @property
    def cpu_features(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("plan", {}).get("cpu_features", ()))

    @property
    def verified(self) -> bool:
        return bool(self.manifest.get("verified", {}).get("ok"))


class BuildCache:
    """Builds keyed by :meth:`BuildPlan.cache_key <buildtools.plan.BuildPlan.cache_key>`."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.builds = home / "builds"
        self.work = home / "work"

    def get(self, key: str) -> CachedBuild | None:
        path = self.builds / key
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        build = CachedBuild(key=key, path=path, manifest=manifest)
        return build if build.binary.is_file() else None

    def list(self) -> list[CachedBuild]:
        """Published builds, newest first."""
        if not self.builds.is_dir():
            return []
        found = (self.get(p.name) for p in self.builds.iterdir() if not p.name.startswith("."))
        return sorted((b for b in found if b is not None), key=lambda b: b.created, reverse=True)

    def find(self, prefix: str) -> CachedBuild:
        """The one build whose key starts with ``prefix``."""
        matches = [b for b in self.list() if b.key.startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise CacheError(
                f"no cached build matches {prefix!r}", hint="`llamactl builds` lists them"
            )
        raise CacheError(
            f"{prefix!r} matches {len(matches)} builds", hint="give more characters of the key"
        )

    def work_dir(self, key: str) -> Path:
        return self.work / key

    def staging_dir(self, key: str) -> Path:
        return self.builds / f".stage-{key}-{os.getpid()}"

    @contextlib.contextmanager
    def lock(
        self,
        key: str,
        *,
        cancel: CancelToken | None = None,
        on_wait: Callable[[], object] | None = None,
    ) -> Iterator[None]:
        """Hold the build lock for ``key``: a second builder of the same plan waits,
        then finds the first one's result in the cache instead of compiling again.

        ``on_wait`` is called once if the lock is held by another builder. With
        ``cancel``, the wait can be cancelled: flock has no timeout, so the lock is
        tried every quarter second, sleeping on the token (a cancel wakes it).
        """
        self.builds.mkdir(parents=True, exist_ok=True)
        with (self.builds / f".{key}.lock").open("a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                if cancel is None:
                    fcntl.flock(fh, fcntl.LOCK_EX)
                else:
                    while True:
                        cancel.raise_if_cancelled()
                        try:
                            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            break
                        except BlockingIOError:
                            cancel.wait(_LOCK_RETRY)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def publish(self, key: str, staged: Path, manifest: dict[str, Any]) -> CachedBuild:
        """Write the manifest into ``staged`` and move it into place atomically."""
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        target = self.builds / key
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
        build = self.get(key)
        if build is None:
            raise CacheError(f"build {key} vanished right after publishing")
        return build

    def remove(self, key: str, *, work: bool = True) -> None:
        shutil.rmtree(self.builds / key, ignore_errors=True)
        if work:
            shutil.rmtree(self.work / key, ignore_errors=True)
