"""Benchmark cases: what to ask a server, and which moments of the answer to time.

A cases file is TOML with one ``[[case]]`` table per case::

    [[case]]
    name = "short-chat"
    prompt = "Say hello."
    max_tokens = 32
    checkpoints = [1, 8, 32, "end"]

A checkpoint ``N`` is the moment the N-th token arrived (``1`` is the time to
first token); ``"end"`` is the moment the answer was complete.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from procman.errors import ConfigError

__all__ = ["END", "BenchCase", "Checkpoint", "checkpoint_label", "load_cases", "parse_cases"]

END: Literal["end"] = "end"

_T = TypeVar("_T")

Checkpoint = int | Literal["end"]

_KEYS = ("name", "prompt", "max_tokens", "checkpoints", "temperature", "ignore_eos", "system")
_DEFAULT_CHECKPOINTS: tuple[Checkpoint, ...] = (1, END)


@dataclass(frozen=True, kw_only=True)
class BenchCase:
    """One request to time."""

    name: str
    """Identifies the case in tables, CSV and plots."""
    prompt: str
    """The user message sent to ``/v1/chat/completions``."""
    max_tokens: int
    """Tokens to generate."""
    checkpoints: tuple[Checkpoint, ...] = _DEFAULT_CHECKPOINTS
    """Token indices (1 = first token) and ``"end"`` whose arrival times are reported."""
    temperature: float = 0.0
    """Sampling temperature; 0 makes repetitions generate the same text."""
    ignore_eos: bool = True
    """Keep generating past end-of-sequence, so every repetition yields ``max_tokens``."""
    system: str | None = None
    """An optional system message."""


def checkpoint_label(checkpoint: Checkpoint) -> str:
    """``"token 8"`` or ``"end"``: the column name of a checkpoint."""
    return END if checkpoint == END else f"token {checkpoint}"


def load_cases(path: Path) -> list[BenchCase]:
    """Read and check a cases file; every problem is a :class:`ConfigError` naming the key."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read cases file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return parse_cases(doc, source=str(path))


def parse_cases(doc: Mapping[str, Any], *, source: str = "cases") -> list[BenchCase]:
    """The cases of a parsed TOML document (``{"case": [{...}, ...]}``)."""
    unknown = sorted(set(doc) - {"case"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key {unknown[0]!r}", hint="use [[case]]")
    raw = doc.get("case")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: no cases", hint="add at least one [[case]] table")
    cases = [_parse_case(item, f"{source}: case[{i}]") for i, item in enumerate(raw)]
    seen: set[str] = set()
    for case in cases:
        if case.name in seen:
            raise ConfigError(f"{source}: case name {case.name!r} is used twice")
        seen.add(case.name)
    return cases


def _parse_case(item: object, where: str) -> BenchCase:
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a table")
    for key in item:
        if key not in _KEYS:
            close = difflib.get_close_matches(key, _KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(_KEYS)}"
            raise ConfigError(f"{where}: unknown key {key!r}", hint=hint)
    for key in ("name", "prompt", "max_tokens"):
        if key not in item:
            raise ConfigError(f"{where}: missing key {key!r}")
    name = _typed(item, "name", str, where)
    where = f"{where} ({name!r})"
    if not name.strip():
        raise ConfigError(f"{where}: key 'name' must not be empty")
    prompt = _typed(item, "prompt", str, where)
    max_tokens = _typed(item, "max_tokens", int, where)
    if max_tokens < 1:
        raise ConfigError(f"{where}: key 'max_tokens' must be >= 1, got {max_tokens}")
    checkpoints = _checkpoints(
        item.get("checkpoints", list(_DEFAULT_CHECKPOINTS)), max_tokens, where
    )
    temperature = item.get("temperature", 0.0)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature < 0:
        raise ConfigError(f"{where}: key 'temperature' must be a number >= 0")
    ignore_eos = item.get("ignore_eos", True)
    if not isinstance(ignore_eos, bool):
        raise ConfigError(f"{where}: key 'ignore_eos' must be true or false")
    system = item.get("system")
    if system is not None and not isinstance(system, str):
        raise ConfigError(f"{where}: key 'system' must be a string")
    return BenchCase(
        name=name,
        prompt=prompt,
        max_tokens=max_tokens,
        checkpoints=checkpoints,
        temperature=float(temperature),
        ignore_eos=ignore_eos,
        system=system,
    )


def _typed(item: Mapping[str, Any], key: str, kind: type[_T], where: str) -> _T:
    value = item[key]
    # bool is an int to Python, never to a person writing a cases file
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: key {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _checkpoints(value: object, max_tokens: int, where: str) -> tuple[Checkpoint, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ConfigError(f"{where}: key 'checkpoints' must be a non-empty list")
    out: list[Checkpoint] = []
    for cp in value:
        if cp == END:
            out.append(END)
        elif isinstance(cp, int) and not isinstance(cp, bool) and 1 <= cp <= max_tokens:
            out.append(cp)
        else:
            raise ConfigError(
                f"{where}: key 'checkpoints' has {cp!r}",
                hint=f'use token indices 1..{max_tokens} (max_tokens) or "end"',
            )
    if len(set(out)) != len(out):
        raise ConfigError(f"{where}: key 'checkpoints' lists a checkpoint twice")
    ints = sorted(c for c in out if c != END)
    return (*ints, *((END,) if END in out else ()))
