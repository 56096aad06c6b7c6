"""What the user typed for a model, turned into a file.

``demo``; a path; ``hf:ORG/REPO[:QUANT|/FILE.gguf][@REVISION]`` (from the
Hugging Face cache, pulled first when it is not there: :mod:`procman.models.pull`);
``ollama:NAME[:TAG]`` and ``lmstudio:PUBLISHER/REPO[/FILE]`` (those tools'
own files, used in place: :mod:`procman.models.discover`); or a name in the
model cache. A path needs no network and imports none of the stores.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from procman.errors import ModelError

if TYPE_CHECKING:
    from procman.models.pull import PullProgress

__all__ = ["DEMO_MODEL", "STORE_PREFIXES", "default_name", "is_store_ref", "resolve_model"]

#: the model reference that means "the built-in demo model"
DEMO_MODEL = "demo"


#: prefixes of references to other tools' stores
STORE_PREFIXES = ("hf:", "ollama:", "lmstudio:")


def is_store_ref(ref: str | Path | None) -> bool:
    """Whether ``ref`` names a model in a store (``hf:``, ``ollama:``, ``lmstudio:``)."""
    return isinstance(ref, str) and ref.startswith(STORE_PREFIXES)


def resolve_model(
    ref: str | Path | None,
    *,
    models_dir: Path | None = None,
    on_progress: Callable[[PullProgress], None] | None = None,
) -> Path:
    """Turn what the user typed into a model path.

    ``None`` or ``demo`` is the built-in demo model (fetched on first use); an
    existing path is used as is; ``hf:...`` is the file in the Hugging Face
    cache, pulled first if it is not there (``on_progress`` hears how the
    download goes); ``ollama:``/``lmstudio:`` names are those tools' files;
    otherwise a name in the model cache (``<home>/models/NAME`` or
    ``NAME.gguf``). A reference that matches nothing is a :class:`ModelError`
    that lists what there is.
    """
    if ref is None or str(ref) == DEMO_MODEL:
        from buildtools.demo import demo_model_path  # speed

        return demo_model_path()
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if is_store_ref(ref):
        return _from_store(str(ref), on_progress)
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


def _from_store(ref: str, on_progress: Callable[[PullProgress], None] | None) -> Path:
    if ref.startswith("hf:"):
        from procman.models.pull import cached, pull  # speed: huggingface_hub on a pull only

        found = cached(ref)  # no network when the cache has it
        return found.path if found is not None else pull(ref, on_progress=on_progress).path
    from procman.models import discover  # speed

    if ref.startswith("ollama:"):
        return discover.resolve_ollama(ref)
    return discover.resolve_lmstudio(ref)


def default_name(model: Path, ref: str | Path | None) -> str:
    """A server name for ``model``: ``demo`` for the demo, ``NAME-TAG`` for an Ollama model
    (its file is a hash), else the file's stem, cleaned."""
    if ref is None or str(ref) == DEMO_MODEL:
        return DEMO_MODEL
    stem = model.name.removesuffix(".gguf")
    if isinstance(ref, str) and ref.startswith("ollama:"):
        stem = ref.removeprefix("ollama:").rsplit("/", 1)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")
    return cleaned[:128] or "model"
