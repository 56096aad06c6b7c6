"""The build cache: only fully published builds are visible; keys are found by prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

from buildtools.cache import BuildCache
from buildtools.errors import CacheError


def stage(cache: BuildCache, key: str) -> Path:
    staged = cache.staging_dir(key)
    (staged / "bin").mkdir(parents=True)
    (staged / "bin" / "llama-server").write_text("#!/bin/sh\n")
    return staged


def test_unpublished_build_is_invisible(tmp_path: Path) -> None:
    cache = BuildCache(tmp_path)
    stage(cache, "abc")
    assert cache.get("abc") is None
    assert cache.list() == []


def test_publish_makes_it_visible_with_its_manifest(tmp_path: Path) -> None:
    cache = BuildCache(tmp_path)
    build = cache.publish(
        "abc123",
        stage(cache, "abc123"),
        {
            "created": 5.0,
            "version": "b11312 (0c1e570)",
            "verified": {"ok": True},
            "plan": {"backend": "cpu"},
        },
    )
    assert build.binary.is_file() and build.verified and build.version == "b11312 (0c1e570)"
    assert [b.key for b in cache.list()] == ["abc123"]
    assert cache.find("abc").key == "abc123"


def test_manifest_without_binary_is_not_a_build(tmp_path: Path) -> None:
    cache = BuildCache(tmp_path)
    cache.publish("k", stage(cache, "k"), {"created": 1.0})
    (tmp_path / "builds" / "k" / "bin" / "llama-server").unlink()
    assert cache.get("k") is None


def test_find_is_strict(tmp_path: Path) -> None:
    cache = BuildCache(tmp_path)
    cache.publish("aa1", stage(cache, "aa1"), {"created": 1.0})
    cache.publish("aa2", stage(cache, "aa2"), {"created": 2.0})
    assert [b.key for b in cache.list()] == ["aa2", "aa1"]
    with pytest.raises(CacheError, match="matches 2 builds"):
        cache.find("aa")
    with pytest.raises(CacheError, match="no cached build"):
        cache.find("zz")
    cache.remove("aa1")
    assert cache.find("aa").key == "aa2"
