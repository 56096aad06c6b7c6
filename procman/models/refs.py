"""What the user typed for a model, turned into a file: a path, ``demo``, or a cached name.

(Where ``hf:ORG/REPO:QUANT`` and other stores will be resolved too.)
"""

from __future__ import annotations

import re
from pathlib import Path

from procman.errors import ModelError

__all__ = ["DEMO_MODEL", "default_name", "resolve_model"]

#: the model reference that means "the built-in demo model"
DEMO_MODEL = "demo"


def resolve_model(ref: str | Path | None, *, models_dir: Path | None = None) -> Path:
    """Turn what the user typed into a model path.

    ``None`` or ``demo`` is the built-in demo model (fetched on first use); an
    existing path is used as is; otherwise a name in the model cache
    (``<home>/models/NAME`` or ``NAME.gguf``). A reference that matches
    nothing is a :class:`ModelError` that lists what the cache holds.
    """
    if ref is None or str(ref) == DEMO_MODEL:
        from buildtools.demo import demo_model_path  # speed

        return demo_model_path()
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if models_dir is None:
        from buildtools.paths import home  # speed

        models_dir = home() / "models"
    if path.name == str(ref):
        for candidate in (models_dir / path.name, models_dir / f"{path.name}.gguf"):
            if candidate.is_file():
                return candidate
    cached = sorted(p.name for p in models_dir.glob("*.gguf")) if models_dir.is_dir() else []
    raise ModelError(
        f"model not found: {ref}",
        hint=(
            f"pass a path to a .gguf file, '{DEMO_MODEL}'"
            + (f", or one of: {', '.join(cached)}" if cached else "")
        ),
    )


def default_name(model: Path, ref: str | Path | None) -> str:
    """A server name for ``model``: ``demo`` for the demo, else the file's stem, cleaned."""
    if ref is None or str(ref) == DEMO_MODEL:
        return DEMO_MODEL
    stem = model.name.removesuffix(".gguf")
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")
    return cleaned[:128] or "model"
