"""Toolchain checks happen before anything runs, with what to install."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from buildtools.builder import _require_tools
from buildtools.errors import ToolchainError
from buildtools.hardware._model import Tool
from tests.unit import profiles as p


def test_complete_toolchain_passes() -> None:
    assert _require_tools(p.AVX2_DESKTOP) == ("/usr/bin/cmake", "/usr/bin/ninja")


@pytest.mark.parametrize(
    ("tools", "message", "hint"),
    [
        ({"cxx": Tool(name="cxx", reason="not found")}, "no C/C++ compiler", "build-essential"),
        (
            {"cmake": Tool(name="cmake", reason="not found")},
            "cmake was not found",
            "pip install cmake",
        ),
        (
            {"cmake": Tool(name="cmake", path="/x/cmake", version="3.10.2")},
            "too old",
            "pip install -U cmake",
        ),
        (
            {"ninja": Tool(name="ninja", reason="not found")},
            "ninja was not found",
            "pip install ninja",
        ),
    ],
)
def test_missing_or_old_tools_are_named_with_a_fix(
    tools: dict[str, Tool], message: str, hint: str
) -> None:
    profile = replace(p.AVX2_DESKTOP, toolchains={**p.AVX2_DESKTOP.toolchains, **tools})
    with pytest.raises(ToolchainError, match=re.escape(message)) as info:
        _require_tools(profile)
    assert info.value.hint is not None and hint in info.value.hint
