"""Server logs: written as output arrives, rotated by size, read back and followed.

Design choice: a server's stdout+stderr is a pipe read by the event loop and
written to ``<home>/logs/<name>.log`` chunk by chunk, rather than a file the
child writes itself. Reasons:

* rotation happens by size *while the server runs* (a busy server logs every
  request; with child-owned files rotation could only happen between
  restarts, and a server that never restarts would grow its log without bound);
* the supervisor keeps the last lines of each run in memory
  (:class:`LineTail`), so a crash report or a bind failure is read from there
  without re-reading the file;
* the child never holds a file descriptor into the log folder.

The cost: if the event loop stalls for long, the child blocks once the pipe
buffer (64 KiB on Linux) is full. Writes are small appends to the page cache,
so they are done inline on the loop.
"""

from __future__ import annotations

import asyncio
import codecs
import os
from collections import deque
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import BinaryIO

__all__ = ["LineTail", "RotatingLog", "follow", "log_path", "read_tail"]

_FOLLOW_INTERVAL = 0.25


def log_path(name: str, home: Path | None = None) -> Path:
    """Where the server called ``name`` logs: ``<llamactl home>/logs/<name>.log``."""
    if home is None:
        from buildtools.paths import home as llamactl_home  # speed

        home = llamactl_home()
    return home / "logs" / f"{name}.log"


class RotatingLog:
    """An append-only log file rotated at ``max_bytes`` into ``.1`` ... ``.backups``."""

    def __init__(self, path: Path, *, max_bytes: int = 10 * 1024 * 1024, backups: int = 3) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: BinaryIO | None = None
        self._size = 0

    def _open(self) -> BinaryIO:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
            self._size = self._file.tell()
        return self._file

    def write(self, data: bytes) -> None:
        """Append ``data``; rotate first if it would overflow a non-empty file.

        A chunk is never split across files, so a rotated file may exceed
        ``max_bytes`` by at most one chunk (64 KiB).
        """
        if not data:
            return
        out = self._open()
        if self._size and self._size + len(data) > self.max_bytes:
            self.rotate()
            out = self._open()
        out.write(data)
        out.flush()
        self._size += len(data)

    def rotate(self) -> None:
        """Shift ``name.log`` -> ``.1`` -> ... -> ``.backups`` (the oldest is dropped)."""
        self.close()
        if self.backups <= 0:
            self.path.unlink(missing_ok=True)
            return
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
        if self.path.exists():
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._size = 0


class LineTail:
    """The last ``lines`` complete lines fed to it, decoded leniently when asked for.

    Fed every read of a server's output (a dozen lines per request): lines are
    kept as bytes, and decoded only by :meth:`text`, which runs on a crash.
    """

    def __init__(self, lines: int = 40) -> None:
        self._lines: deque[bytes] = deque(maxlen=lines)
        self._partial = b""

    def feed(self, data: bytes) -> None:
        *complete, self._partial = (self._partial + data).split(b"\n")
        self._lines.extend(complete)
        if len(self._partial) > 16384:  # a line without end (progress dots) must not grow forever
            self._lines.append(self._partial)
            self._partial = b""

    def clear(self) -> None:
        self._lines.clear()
        self._partial = b""

    def text(self) -> str:
        lines = [line.decode(errors="replace").rstrip("\r") for line in self._lines]
        if self._partial:
            lines.append(self._partial.decode(errors="replace"))
        return "\n".join(lines)


def _last_lines(handle: BinaryIO, lines: int, block: int = 8192) -> list[str]:
    """The last ``lines`` lines of ``handle``, read backwards from its end, where it is left."""
    end = handle.seek(0, os.SEEK_END)
    if lines <= 0:
        return []
    data = b""
    position = end
    while position > 0 and data.count(b"\n") <= lines:
        step = min(block, position)
        position -= step
        handle.seek(position)
        data = handle.read(step) + data
    handle.seek(end)
    return data.decode(errors="replace").splitlines()[-lines:]


def read_tail(path: Path, lines: int = 50) -> list[str]:
    """The last ``lines`` lines of ``path`` (logs can be big: only the end is read)."""
    with path.open("rb") as handle:
        return _last_lines(handle, lines)


async def follow(
    path: Path, *, lines: int = 0, interval: float = _FOLLOW_INTERVAL
) -> AsyncGenerator[str, None]:
    """Yield the last ``lines`` lines of ``path``, then text as it is appended, across rotations.

    Runs until cancelled (or the consumer stops iterating). It polls: files
    have no portable change notification (inotify is Linux only and not in
    the standard library), and a quarter second is immediate for a human
    reading a log. A rotation is noticed when the path names another file
    (new inode) or the file shrank; the rest of the old file is read first,
    and the new file is read from its start.
    """
    handle: BinaryIO | None = None
    identity: tuple[int, int] | None = None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    first = True
    try:
        while True:
            if handle is None:
                try:
                    handle = path.open("rb")
                except FileNotFoundError:
                    await asyncio.sleep(interval)
                    continue
                stat = os.fstat(handle.fileno())
                identity = (stat.st_dev, stat.st_ino)
                if first:
                    for line in _last_lines(handle, lines):
                        yield line + "\n"
                first = False
            if chunk := handle.read(65536):
                if text := decoder.decode(chunk):
                    yield text
                continue
            try:
                current = path.stat()  # noqa: ASYNC240 - one stat per idle poll, microseconds
            except FileNotFoundError:
                current = None
            if current is not None and (
                (current.st_dev, current.st_ino) != identity or current.st_size < handle.tell()
            ):
                handle.close()
                handle = None
                continue
            await asyncio.sleep(interval)
    finally:
        if handle is not None:
            handle.close()
