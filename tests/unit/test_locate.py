"""Which server `serve` runs: the documented order, without any process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from buildtools.cache import BuildCache
from buildtools.errors import CacheError
from buildtools.locate import candidates, resolve_server


def publish(
    home: Path,
    key: str,
    *,
    created: float,
    features: list[str],
    portable: bool = False,
    verified: bool = True,
) -> Path:
    cache = BuildCache(home)
    staged = cache.staging_dir(key)
    (staged / "bin").mkdir(parents=True)
    binary = staged / "bin" / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    manifest: dict[str, Any] = {
        "created": created,
        "verified": {"ok": verified},
        "plan": {
            "backend": "cpu",
            "cpu_features": features,
            "cmake_defines": {"GGML_BACKEND_DL": "ON" if portable else "OFF"},
        },
    }
    return cache.publish(key, staged, manifest).binary


def have(*features: str) -> Any:
    return lambda: frozenset(features)


def test_builds_this_machine_cannot_run_are_skipped_with_the_reason(tmp_path: Path) -> None:
    publish(tmp_path, "avx512", created=2.0, features=["avx2", "avx512f"])
    publish(tmp_path, "avx2", created=1.0, features=["avx2"])
    cands = candidates(tmp_path, cpu_features=have("avx2"))
    assert [(c.build.key, c.usable) for c in cands] == [("avx512", False), ("avx2", True)]
    assert "avx512f" in cands[0].reason


def test_machine_builds_rank_before_portable_ones(tmp_path: Path) -> None:
    publish(tmp_path, "portable", created=3.0, features=[], portable=True)
    publish(tmp_path, "native", created=1.0, features=["avx2"])
    assert [c.build.key for c in candidates(tmp_path, cpu_features=have("avx2"))] == [
        "native",
        "portable",
    ]


def test_unverified_build_is_never_used(tmp_path: Path) -> None:
    publish(tmp_path, "k", created=1.0, features=[], verified=False)
    (cand,) = candidates(tmp_path, cpu_features=have())
    assert not cand.usable and "never verified" in cand.reason


def test_explicit_then_env_then_cache_then_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("buildtools.locate.bundled_server", lambda: None)
    monkeypatch.setattr("buildtools.locate._usable_cpu_features", have("avx2"))
    explicit = tmp_path / "mine"
    explicit.write_text("")
    explicit.chmod(0o755)
    env = {"LLAMACTL_SERVER": str(explicit), "PATH": ""}
    assert resolve_server(explicit, env=env, home=tmp_path).origin == "explicit"
    assert resolve_server(env=env, home=tmp_path).origin == "env"
    with pytest.raises(CacheError, match="no llama-server is available"):
        resolve_server(env={"PATH": ""}, home=tmp_path)
    on_path = tmp_path / "pathdir"
    on_path.mkdir()
    (on_path / "llama-server").write_text("")
    (on_path / "llama-server").chmod(0o755)
    assert resolve_server(env={"PATH": str(on_path)}, home=tmp_path).origin == "path"
    cached = publish(tmp_path, "k", created=1.0, features=["avx2"])
    got = resolve_server(env={"PATH": str(on_path)}, home=tmp_path)
    assert got.origin == "cache" and got.binary == cached


def test_a_bad_explicit_server_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="is not an executable file"):
        resolve_server(tmp_path / "missing", env={}, home=tmp_path)
