"""``serve --config FILE --watch``: reload when the file changes.

It polls, once a second, the file's identity and size and modification
time (nanoseconds): the standard library has no change notification
(inotify is Linux only), editors that save by renaming give the path a new
inode, which a watch on the old file would miss, and a second is prompt
for an edit a human makes. A change must hold still for one more poll
before it is reloaded, so a file caught half written is not read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

__all__ = ["watch"]

Stamp = tuple[int, int, int, int] | None


def _stamp(path: Path) -> Stamp:
    try:
        stat = path.stat()
    except OSError:
        return None  # gone for a moment (an editor's rename): wait for it to come back
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


async def watch(
    path: Path, changed: Callable[[], Awaitable[object]], *, interval: float = 1.0
) -> None:
    """Call ``changed()`` after each settled change of ``path``, until cancelled."""
    seen = _stamp(path)
    pending: Stamp = None
    while True:
        await asyncio.sleep(interval)  # a poll: see the module docstring
        now = _stamp(path)
        if now is None or now == seen:
            pending = None
            continue
        if now != pending:  # changed since the last poll: let it settle
            pending = now
            continue
        seen, pending = now, None
        await changed()
