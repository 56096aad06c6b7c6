"""Imports each command module so that it registers on the app."""

from __future__ import annotations

from procman.cli import (  # noqa: F401 - each module registers its commands
    _bench,
    _build,
    _config,
    _ctl,
    _daemon,
    _detect,
    _estimate,
    _serve,
)

__all__: list[str] = []
