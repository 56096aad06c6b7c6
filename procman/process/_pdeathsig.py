"""The pre-exec hook that ties a child's life to ours (Linux), importable at launch.

Kept apart from :mod:`procman.process._child` (asyncio, logging) because
:mod:`procman.process._early` spawns llama-server before anything heavy is imported.
See :mod:`procman.process._child` for what each OS gets.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["child_setup"]

_PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        func: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return func


def child_setup(*, ignore_sigpipe: bool = False) -> Callable[[], None] | None:
    """A ``preexec_fn``: SIGKILL for the child when this thread dies (None off Linux
    unless ``ignore_sigpipe``).

    The child re-checks ``getppid()`` right after ``prctl``, closing the race
    in which the parent dies between ``fork`` and ``prctl``. ``ignore_sigpipe``:
    the child starts with SIGPIPE ignored (it survives exec), so a write to a
    peer that has gone fails with EPIPE instead of killing it (ggml-rpc-server
    dies so when its leader vanished while it was computing).
    """
    prctl = _prctl()  # resolved here, in the parent: the child only calls it
    if prctl is None and not ignore_sigpipe:
        return None
    parent = os.getpid()

    def setup() -> None:
        if ignore_sigpipe:  # after subprocess restored the default dispositions
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        if prctl is None:
            return
        prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody will stop us
            os._exit(1)

    return setup
