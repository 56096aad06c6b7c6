"""``hf:ORG/REPO[:QUANT|/FILE.gguf][@REVISION]``: what a Hugging Face reference names.

Pure functions, no network: :func:`parse_hf_ref` reads the reference,
:func:`choose_files` picks the GGUF file(s) it means from a repository's file
list. Both are shared by the download (:mod:`procman.models.pull`) and the
offline lookup in the local cache, so a reference means the same file online
and offline.

A quant name matches a file whose name carries it as a whole token
(``Q4_K`` does not match ``...-Q4_K_M.gguf``). A split model
(``name-00001-of-00003.gguf``) is one model: all its parts are chosen, the
first one is what llama-server is given (it opens the others beside it).
Multimodal projectors (``mmproj-*.gguf``) are never chosen by a quant.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from procman.errors import ModelError

__all__ = ["HF_PREFIX", "HfRef", "choose_files", "is_hf_ref", "parse_hf_ref", "quant_of"]

HF_PREFIX = "hf:"
#: what llama.cpp's ``-hf`` picks when a repository holds several quants and none is named
DEFAULT_QUANT = "Q4_K_M"
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
#: quant labels as publishers write them in file names (Q4_K_M, IQ3_XXS, F16, BF16, Q8_0...)
_QUANT = re.compile(
    r"(?:^|[-._])((?:I?Q\d+(?:_[A-Z0-9]+)*)|BF16|F16|F32|FP16|FP32|MXFP4(?:_MOE)?|TQ\d_\d)"
    r"(?=[-._]|$)",
    re.IGNORECASE,
)
_EXAMPLE = "hf:bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M"


def is_hf_ref(ref: object) -> bool:
    return isinstance(ref, str) and ref.startswith(HF_PREFIX)


@dataclass(frozen=True, kw_only=True)
class HfRef:
    """A parsed ``hf:`` reference; ``quant`` and ``filename`` are never both set."""

    repo_id: str
    """``ORG/REPO``."""
    quant: str | None = None
    """A quantisation label such as ``Q4_K_M``."""
    filename: str | None = None
    """A file path inside the repository."""
    revision: str | None = None
    """A branch, tag or commit; ``None`` is the default branch (``main``)."""

    def __str__(self) -> str:
        tail = f":{self.quant}" if self.quant else f"/{self.filename}" if self.filename else ""
        return f"{HF_PREFIX}{self.repo_id}{tail}" + (f"@{self.revision}" if self.revision else "")


def parse_hf_ref(ref: str) -> HfRef:
    """Read ``hf:ORG/REPO[:QUANT|/FILE.gguf][@REVISION]``; a malformed one is a ModelError."""
    body = ref.removeprefix(HF_PREFIX)
    body, at, revision = body.partition("@")
    if at and not revision:
        raise _bad(ref, "nothing follows '@' (a branch, tag or commit)")
    body, colon, quant = body.partition(":")
    if colon and not quant:
        raise _bad(ref, "nothing follows ':' (a quantisation such as Q4_K_M)")
    parts = body.split("/")
    if len(parts) < 2 or not all(_REPO_PART.match(p) for p in parts[:2]):
        raise _bad(ref, "it needs ORG/REPO")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    if filename is not None:
        if quant:
            raise _bad(ref, "name a quantisation or a file, not both")
        if not filename.lower().endswith(".gguf") or ".." in filename.split("/"):
            raise _bad(ref, f"{filename!r} is not a .gguf file in the repository")
    if quant and not re.fullmatch(r"[A-Za-z0-9_]+", quant):
        raise _bad(ref, f"{quant!r} is not a quantisation label")
    return HfRef(repo_id=repo_id, quant=quant or None, filename=filename, revision=revision or None)


def _bad(ref: str, why: str) -> ModelError:
    return ModelError(
        f"invalid Hugging Face reference {ref!r}: {why}",
        hint=f"write hf:ORG/REPO[:QUANT|/FILE.gguf][@REVISION], e.g. {_EXAMPLE}",
    )


def quant_of(filename: str) -> str | None:
    """The quant label in a file name (the last one: ``model-F16-Q4_K_M.gguf`` is Q4_K_M)."""
    name = _SPLIT.sub(".gguf", filename.rsplit("/", 1)[-1])
    found = _QUANT.findall(name.removesuffix(".gguf"))
    return found[-1].upper() if found else None


def _model_key(filename: str) -> str:
    """The name of the model a file belongs to: its path without the split suffix."""
    return _SPLIT.sub(".gguf", filename)


def _is_projector(filename: str) -> bool:
    return "mmproj" in filename.rsplit("/", 1)[-1].lower()


def choose_files(ref: HfRef, files: Iterable[str]) -> tuple[str, ...]:
    """The file(s) of the one model ``ref`` names among ``files`` (a repository's listing).

    First the file llama-server is given, then the other parts of a split
    model. Raises ModelError listing what exists when ``ref`` matches none or
    several models.
    """
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    models: dict[str, list[str]] = {}
    for f in ggufs:
        models.setdefault(_model_key(f), []).append(f)
    if ref.filename is not None:
        wanted = _model_key(ref.filename)
        if ref.filename not in ggufs:
            raise _no_match(ref, f"has no file {ref.filename}", models)
        return _ordered(models[wanted])
    candidates = {k: v for k, v in models.items() if not _is_projector(k)}
    if ref.quant is not None:
        quant = ref.quant.upper()
        matching = {k: v for k, v in candidates.items() if quant_of(k) == quant}
        if not matching:
            raise _no_match(ref, f"has no {ref.quant} file", models)
    elif len(candidates) > 1:
        matching = {k: v for k, v in candidates.items() if quant_of(k) == DEFAULT_QUANT}
        if not matching:
            raise _no_match(ref, "holds several models: name one", models)
    else:
        matching = candidates
    if not matching:
        raise _no_match(ref, "holds no GGUF model", models)
    if len(matching) > 1:
        raise _no_match(ref, f"has {len(matching)} files that match", matching)
    return _ordered(next(iter(matching.values())))


def _ordered(parts: list[str]) -> tuple[str, ...]:
    if len(parts) > 1 or _SPLIT.search(parts[0]):
        counts = {int(m.group(2)) for p in parts if (m := _SPLIT.search(p))}
        numbers = sorted(int(m.group(1)) for p in parts if (m := _SPLIT.search(p)))
        if len(counts) != 1 or numbers != list(range(1, next(iter(counts)) + 1)):
            raise ModelError(
                f"split model {_model_key(parts[0])} is incomplete in the repository "
                f"({len(parts)} part(s) found)",
                hint="name another file or quantisation",
            )
        parts = sorted(parts, key=_part_number)
    return tuple(parts)


def _part_number(filename: str) -> int:
    m = _SPLIT.search(filename)
    return int(m.group(1)) if m else 0


def _no_match(ref: HfRef, why: str, models: dict[str, list[str]]) -> ModelError:
    listing = []
    for key, parts in sorted(models.items()):
        label = quant_of(key)
        split = f" ({len(parts)} parts)" if len(parts) > 1 else ""
        listing.append(f"{key}{split}" + (f" [{label}]" if label else ""))
    shown = "; ".join(listing[:20]) + (
        f"; ... {len(listing) - 20} more" if len(listing) > 20 else ""
    )
    example = next((quant_of(k) for k in sorted(models) if quant_of(k)), None)
    how = (
        f"name one: hf:{ref.repo_id}:{example} or hf:{ref.repo_id}/FILE.gguf"
        if example
        else f"name one: hf:{ref.repo_id}/FILE.gguf"
    )
    return ModelError(
        f"{ref.repo_id}{f'@{ref.revision}' if ref.revision else ''} {why}"
        + (f"; it has: {shown}" if listing else " (it has no .gguf file)"),
        hint=how if listing else "pick a repository that publishes GGUF files",
    )
