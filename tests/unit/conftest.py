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
