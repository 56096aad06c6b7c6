"""Imports each command module so that it registers on the app."""

from __future__ import annotations

from procman.cli import _build, _config, _ctl, _daemon, _detect, _estimate, _serve  # noqa: F401

__all__: list[str] = []
