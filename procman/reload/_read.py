"""Read a config file for a reload, with the line an error is on.

A reload that is refused must say where the file is wrong, and the
operator is looking at the file, not at a key path. TOML syntax errors
carry their line already (tomllib says ``at line 7, column 3``); a key
that parses but is invalid (``models.chat.ctx: must be at least 0``) is
found again in the text: the ``[models.chat]`` header, then the first
``ctx =`` under it.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from procman.config import Config, parse_config
from procman.errors import ConfigError, LlamactlError

__all__ = ["at_line", "line_of", "read_config"]

_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
_KEY_PATH = re.compile(r"^((?:server|models)(?:\.[A-Za-z0-9_.\-]+)?):")


def _table_name(header: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in header.split("."))


def line_of(text: str, path: str) -> int | None:
    """The 1-based line that ``path`` (``models.chat.ctx``, ``server.port``,
    ``models.chat``) is written on in ``text``, or None if it cannot be found."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):  # the longest table the path names, then its key
        table, key = ".".join(parts[:cut]), ".".join(parts[cut:])
        current = None
        for number, line in enumerate(text.splitlines(), start=1):
            if header := _HEADER.match(line):
                current = _table_name(header.group(1))
                if current == table and not key:
                    return number
                continue
            if current == table and key:
                name = line.split("=", 1)[0].strip().strip("\"'")
                if "=" in line and name == key:
                    return number
    return None


def read_config(path: Path) -> Config:
    """Read and validate ``path`` like ``serve --config`` does; errors name their line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise at_line(exc, path, text) from exc


def at_line(exc: LlamactlError, path: Path, text: str | None = None) -> LlamactlError:
    """``exc`` with ``FILE:LINE:`` before its message when it starts with a key path (as
    ``models.chat: model not found`` does) that is in the file; else ``exc`` itself."""
    found = _KEY_PATH.match(exc.message)
    if found is None:
        return exc
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = ""
    line = line_of(text, found.group(1))
    where = f"{path}:{line}" if line is not None else str(path)
    return type(exc)(f"{where}: {exc.message}", hint=exc.hint)
