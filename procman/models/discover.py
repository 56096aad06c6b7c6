"""GGUF models already on this machine, where other tools keep them; used in place, never copied.

Each store is read as the tool that writes it lays it out:

* the Hugging Face cache (``hf download``, transformers, ``llamactl pull``):
  ``models--ORG--REPO/snapshots/<commit>/FILE`` links into ``blobs/``;
  named ``hf:ORG/REPO/FILE`` (``@COMMIT`` when not the one ``refs/main``
  points to), the reference ``llamactl serve`` resolves offline;
* LM Studio: ``<models folder>/PUBLISHER/REPO/FILE.gguf``; named
  ``lmstudio:PUBLISHER/REPO/FILE.gguf``;
* Ollama: ``manifests/REGISTRY/NAMESPACE/MODEL/TAG`` (JSON) whose layer of
  type ``application/vnd.ollama.image.model`` names the blob
  ``blobs/sha256-HEX``, a GGUF file; named ``ollama:MODEL:TAG``
  (``NAMESPACE/MODEL:TAG`` outside ``library``, ``REGISTRY/...`` outside
  registry.ollama.ai);
* folders the user names (``model_dirs`` in the config, ``--dir``): every
  ``*.gguf`` below them, named by path; and ``<llamactl home>/models``.

Where each store lives comes from :class:`Stores`, built from the environment
by :func:`default_stores`, so that tests (and users) can point each at any
folder. Split models are listed once (their first part); multimodal
projectors are not models and are skipped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from procman.errors import ModelError

__all__ = [
    "Found",
    "Source",
    "Stores",
    "default_stores",
    "find_models",
    "resolve_lmstudio",
    "resolve_ollama",
]

_SPLIT_PART = re.compile(r"-(\d{5})-of-\d{5}\.gguf$", re.IGNORECASE)
_OLLAMA_MODEL = "application/vnd.ollama.image.model"
_OLLAMA_REGISTRY = "registry.ollama.ai"


class Source(StrEnum):
    PULLED = "pulled"
    """Downloaded by ``llamactl pull`` (in the Hugging Face cache)."""
    HF_CACHE = "hf-cache"
    LMSTUDIO = "lmstudio"
    OLLAMA = "ollama"
    FOLDER = "folder"


@dataclass(frozen=True, kw_only=True)
class Found:
    """One model file on disk and the reference that names it."""

    ref: str
    source: Source
    path: Path
    #: files of a split model (1 for most)
    parts: int = 1


@dataclass(frozen=True, kw_only=True)
class Stores:
    """Where each tool keeps its models on this machine (absent folders are skipped)."""

    hf_cache: Path | None = None
    lmstudio: tuple[Path, ...] = ()
    ollama: tuple[Path, ...] = ()
    folders: tuple[Path, ...] = ()


def default_stores(
    env: Mapping[str, str] | None = None, *, folders: tuple[Path, ...] = ()
) -> Stores:
    """The stores' usual places, honouring ``HF_HUB_CACHE``/``HF_HOME``, ``OLLAMA_MODELS``,
    LM Studio's home pointer and ``downloadsFolder`` setting; plus ``<llamactl home>/models``."""
    from buildtools.paths import home  # speed
    from procman.models.pull import hf_cache_dir  # speed

    env = os.environ if env is None else env
    user = Path(env.get("HOME") or Path.home())
    ollama = (
        (Path(env["OLLAMA_MODELS"]).expanduser(),)
        if env.get("OLLAMA_MODELS")
        else (user / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models"))
    )
    return Stores(
        hf_cache=hf_cache_dir(env),
        lmstudio=_lmstudio_roots(user),
        ollama=ollama,
        folders=(*folders, home(env) / "models"),
    )


def _lmstudio_roots(user: Path) -> tuple[Path, ...]:
    lm_home = user / ".lmstudio"
    pointer = _read(user / ".lmstudio-home-pointer")  # LM Studio's home, when the user moved it
    if pointer:
        lm_home = Path(pointer)
    roots = [lm_home / "models", user / ".cache" / "lm-studio" / "models"]
    try:
        settings = json.loads((lm_home / "settings.json").read_text())
        if isinstance(settings, dict) and isinstance(settings.get("downloadsFolder"), str):
            roots.insert(0, Path(settings["downloadsFolder"]).expanduser())
    except (OSError, ValueError):
        pass
    return tuple(dict.fromkeys(roots))


def find_models(stores: Stores) -> list[Found]:
    """Every model in every store, each file once (the first store that names it wins)."""
    from procman.models import _pulled  # speed

    pulled = {str(r.get("path")) for r in _pulled.load()}
    found: dict[Path, Found] = {}
    streams: list[Iterator[Found]] = []
    if stores.hf_cache is not None:
        streams.append(_hf_cache(stores.hf_cache, pulled))
    streams += [_lmstudio(root) for root in stores.lmstudio]
    streams += [_ollama(root) for root in stores.ollama]
    streams += [_folder(root) for root in stores.folders]
    for stream in streams:
        for item in stream:
            key = item.path.resolve()
            if key not in found:
                found[key] = item
    return list(found.values())


def _is_model_file(path: Path) -> bool:
    name = path.name.lower()
    if "mmproj" in name or not name.endswith(".gguf"):
        return False
    m = _SPLIT_PART.search(name)
    return (m is None or int(m.group(1)) == 1) and path.is_file()


def _parts(path: Path) -> int:
    m = re.search(r"-of-(\d{5})\.gguf$", path.name, re.IGNORECASE)
    return int(m.group(1)) if m else 1


def _hf_cache(cache: Path, pulled: set[str]) -> Iterator[Found]:
    if not cache.is_dir():
        return
    for storage in sorted(cache.glob("models--*--*")):
        repo_id = storage.name.removeprefix("models--").replace("--", "/", 1)
        main = _read(storage / "refs" / "main")
        snapshots = sorted(
            (storage / "snapshots").glob("*"), key=lambda s: s.name != main
        )  # the default branch's first: its files get the short name
        seen: set[Path] = set()
        for snapshot in snapshots:
            for path in sorted(snapshot.rglob("*.gguf")):
                if not _is_model_file(path) or path.resolve() in seen:
                    continue
                seen.add(path.resolve())
                rel = path.relative_to(snapshot).as_posix()
                at = "" if snapshot.name == main else f"@{snapshot.name}"
                source = Source.PULLED if str(path) in pulled else Source.HF_CACHE
                yield Found(
                    ref=f"hf:{repo_id}/{rel}{at}", source=source, path=path, parts=_parts(path)
                )


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _lmstudio(root: Path) -> Iterator[Found]:
    if not root.is_dir():
        return
    for path in sorted(root.glob("*/*/**/*.gguf")):
        if _is_model_file(path):
            rel = path.relative_to(root).as_posix()
            yield Found(
                ref=f"lmstudio:{rel}", source=Source.LMSTUDIO, path=path, parts=_parts(path)
            )


def _folder(root: Path) -> Iterator[Found]:
    root = root.expanduser()
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*.gguf")):
        if _is_model_file(path):
            yield Found(ref=str(path), source=Source.FOLDER, path=path, parts=_parts(path))


# -- Ollama ------------------------------------------------------------------------------------
def _ollama(root: Path) -> Iterator[Found]:
    manifests = root / "manifests"
    if not manifests.is_dir():
        return
    listed = (p for p in manifests.glob("*/*/*/*") if p.is_file())
    # Ollama's own registry first: one blob pulled under two names is listed by the short one
    for manifest in sorted(listed, key=lambda p: (p.parts[-4] != _OLLAMA_REGISTRY, p)):
        registry, namespace, model, tag = manifest.relative_to(manifests).parts
        blob = _ollama_blob(root, manifest)
        if blob is not None:
            name = _ollama_name(registry, namespace, model, tag)
            yield Found(ref=f"ollama:{name}", source=Source.OLLAMA, path=blob)


def _ollama_name(registry: str, namespace: str, model: str, tag: str) -> str:
    if registry != _OLLAMA_REGISTRY:
        return f"{registry}/{namespace}/{model}:{tag}"
    return f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"


def _ollama_blob(root: Path, manifest: Path) -> Path | None:
    """The GGUF blob a manifest names; None for another format or a blob not (fully) there."""
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    for layer in layers if isinstance(layers, list) else ():
        if not isinstance(layer, dict) or layer.get("mediaType") != _OLLAMA_MODEL:
            continue
        digest = str(layer.get("digest", ""))
        blob = root / "blobs" / digest.replace(":", "-")
        try:
            with blob.open("rb") as f:
                magic = f.read(4)
            size_ok = layer.get("size") in (None, blob.stat().st_size)
        except OSError:
            return None
        return blob if magic == b"GGUF" and size_ok else None
    return None


def resolve_ollama(ref: str, stores: Stores | None = None) -> Path:
    """``ollama:NAME[:TAG]`` (``NAMESPACE/NAME``, ``REGISTRY/NAMESPACE/NAME`` too) -> its blob."""
    name = ref.removeprefix("ollama:")
    model, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    tag = tag or "latest"
    parts = model.split("/")
    if len(parts) == 1:
        parts = [_OLLAMA_REGISTRY, "library", *parts]
    elif len(parts) == 2:
        parts = [_OLLAMA_REGISTRY, *parts]
    roots = (stores or default_stores()).ollama
    if len(parts) != 3 or not all(parts):
        raise ModelError(
            f"invalid Ollama model name {ref!r}",
            hint="write ollama:NAME[:TAG], e.g. ollama:llama3.2:3b",
        )
    for root in roots:
        manifest = root / "manifests" / Path(*parts) / tag
        if manifest.is_file():
            blob = _ollama_blob(root, manifest)
            if blob is None:
                raise ModelError(
                    f"Ollama's {name} is not a GGUF model llamactl can serve "
                    "(no model layer, a blob missing, or another format)",
                    hint="run `ollama pull` for it again, or use another model",
                )
            return blob
    known = sorted(f.ref for root in roots for f in _ollama(root))
    raise ModelError(
        f"Ollama model {model}:{tag} not found",
        hint=(f"Ollama has: {', '.join(known[:12])}" if known else "`ollama pull` it first")
        + f" (looked in {', '.join(str(r) for r in roots)}; OLLAMA_MODELS sets the folder)",
    )


def resolve_lmstudio(ref: str, stores: Stores | None = None) -> Path:
    """``lmstudio:PUBLISHER/REPO[/FILE.gguf]`` -> the file (a folder must hold one model)."""
    name = ref.removeprefix("lmstudio:").strip("/")
    roots = (stores or default_stores()).lmstudio
    if not name or ".." in name.split("/"):
        raise ModelError(
            f"invalid LM Studio model name {ref!r}",
            hint="write lmstudio:PUBLISHER/REPO[/FILE.gguf], as `llamactl models` lists them",
        )
    for root in roots:
        target = root / name
        if target.is_file():
            return target
        if target.is_dir():
            models = [f.path for f in _lmstudio(root) if f.path.is_relative_to(target)]
            if len(models) == 1:
                return models[0]
            if models:
                names = ", ".join(f"lmstudio:{m.relative_to(root).as_posix()}" for m in models)
                raise ModelError(
                    f"LM Studio's {name} holds {len(models)} models", hint=f"name one: {names}"
                )
    known = sorted(f.ref for root in roots for f in _lmstudio(root))
    raise ModelError(
        f"LM Studio model {name} not found",
        hint=(f"LM Studio has: {', '.join(known[:12])}" if known else "download it in LM Studio")
        + f" (looked in {', '.join(str(r) for r in roots)})",
    )
