"""Sizes ("2GiB") and durations ("10m") as people write them in config files.

Parsed once, at the edge, into plain numbers (bytes, seconds) so nothing
downstream ever sees a unit string. Binary and decimal prefixes both exist in
the wild ("GB" in model cards, "GiB" in ``free -h``); both are accepted and
mean what they say. A bare number is bytes or seconds.
"""

from __future__ import annotations

import re

from procman.errors import ConfigError

__all__ = [
    "duration_option", "format_bytes", "format_duration", "format_size", "parse_duration",
    "parse_size",
]  # fmt: skip

_MIB = 1 << 20
_GIB = 1 << 30

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4,
}  # fmt: skip
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_SIZE = re.compile(rf"^{_NUMBER}\s*([a-z]*)$")
_DURATION_PART = re.compile(rf"{_NUMBER}\s*(ms|s|m|h|d)")


def parse_size(value: str | int) -> int:
    """Bytes in ``value``: ``1073741824``, ``"512MiB"``, ``"2 GiB"``, ``"1.5GB"``.

    Raises ``ValueError``/``TypeError`` with a message fit for the user.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"expected a size such as '2GiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return value
    match = _SIZE.match(value.strip().lower())
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as '512MiB' or '2GiB', got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def parse_duration(value: str | int | float) -> float:
    """Seconds in ``value``: ``30``, ``"90s"``, ``"10m"``, ``"1h30m"``, ``"250ms"``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"expected a duration such as '10m', got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value}")
        return float(value)
    text = value.strip().lower()
    if re.fullmatch(_NUMBER, text):  # a bare number is seconds, but only on its own
        return float(text)
    total, position = 0.0, 0
    while position < len(text):
        part = _DURATION_PART.match(text, position)
        if part is None:
            break
        total += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
        position = part.end()
        while text[position : position + 1] == " ":  # "1h 30m"
            position += 1
    if not text or position != len(text):
        raise ValueError(f"expected a duration such as '30s', '10m' or '1h30m', got {value!r}")
    return total


def duration_option(text: str, option: str) -> float:
    """:func:`parse_duration` for a command-line option: a ``ConfigError`` naming it."""
    try:
        return parse_duration(text)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{option}: {exc}", hint="e.g. 30s, 5m, 1h, or seconds") from exc


def format_bytes(n: int | None, *, digits: int | None = None) -> str:
    """Bytes for people reading a message or a table: ``212 MiB``, ``7.5 GiB``; ``-``
    when unknown. With ``digits``, that many decimals in the largest unit that fits
    (``1.23 GiB``, as llama.cpp's own logs print sizes)."""
    if n is None:
        return "-"
    if digits is not None:
        for unit, scale in (("GiB", _GIB), ("MiB", _MIB), ("KiB", 1024)):
            if abs(n) >= scale:
                return f"{n / scale:.{digits}f} {unit}"
        return f"{n} B"
    if abs(n) >= 10 * _GIB:
        return f"{n / _GIB:.0f} GiB"
    if abs(n) >= _GIB:
        return f"{n / _GIB:.1f} GiB"
    return f"{n / _MIB:.0f} MiB"


def format_size(size: int) -> str:
    """``2147483648`` → ``"2GiB"``: the shortest exact binary form, for messages and files."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def format_duration(seconds: float) -> str:
    """``600.0`` → ``"10m"``; fractions of a second stay in seconds."""
    for unit, factor in (("h", 3600), ("m", 60)):
        if seconds and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s"
