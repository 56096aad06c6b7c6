"""Unit tests run no real process: probes get fake runners, servers fake binaries."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import pytest


class RealProcessForbidden(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _forbid_subprocesses(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RealProcessForbidden(f"unit tests must not start processes: {args[:1]!r}")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", refuse)
    monkeypatch.setattr(asyncio, "create_subprocess_shell", refuse)


@pytest.fixture(autouse=True)
def _private_model_info(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validations a unit test records go to a scratch file, not the user's cache."""
    from procman.models import _info_cache

    store = tmp_path_factory.mktemp("info") / "model-info.json"
    monkeypatch.setattr(_info_cache, "store_path", lambda: store)
