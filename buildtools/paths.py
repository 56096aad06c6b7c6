"""Where llamactl keeps what it downloads and builds.

Everything lives under one home so that it can be inspected, moved or
removed as a whole: ``$LLAMACTL_HOME``, else ``$XDG_CACHE_HOME/llamactl``,
else ``~/.cache/llamactl`` (``~/Library/Caches/llamactl`` on macOS).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["home", "write_atomic", "write_json_atomic"]


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


def write_json_atomic(path: Path, doc: Any) -> None:
    """Replace the small JSON record at *path* in one step; see :func:`write_atomic`."""
    write_atomic(path, json.dumps(doc).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Replace the file at *path* with *data* in one step (temporary file + rename).

    Readers in other processes see the old content or the new one, never half
    of it; the temporary file is removed if writing fails. The file is
    readable by its owner only (``mkstemp``). Raises OSError.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise
