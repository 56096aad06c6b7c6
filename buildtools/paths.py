"""Where llamactl keeps what it downloads and builds.

Everything lives under one home so that it can be inspected, moved or
removed as a whole: ``$LLAMACTL_HOME``, else ``$XDG_CACHE_HOME/llamactl``,
else ``~/.cache/llamactl`` (``~/Library/Caches/llamactl`` on macOS).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["home"]


def home(env: Mapping[str, str] | None = None) -> Path:
    """The llamactl cache root, resolved from ``env`` (default: ``os.environ``)."""
    env = os.environ if env is None else env
    if explicit := env.get("LLAMACTL_HOME"):
        return Path(explicit).expanduser()
    if xdg := env.get("XDG_CACHE_HOME"):
        return Path(xdg) / "llamactl"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "llamactl"
    return Path.home() / ".cache" / "llamactl"
