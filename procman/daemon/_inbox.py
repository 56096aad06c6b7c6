"""Calls made on any thread, run on one: how library callbacks reach a GUI thread.

The supervisor calls ``on_event``/``on_log`` callbacks from its loop thread,
and :func:`procman.prepare` reports progress from its build thread; a GUI
toolkit may only be touched from its own thread. An :class:`Inbox` queues
the calls and has a file descriptor that is readable while any wait, which
every toolkit's main loop can watch without polling and without a
cross-thread call into the toolkit (the one that deadlocks when the GUI
thread is itself waiting for the supervisor, e.g. in ``close()``)::

    inbox = procman.Inbox()
    root.createfilehandler(inbox, tkinter.READABLE, lambda *_: inbox.run_pending())  # Tk
    QSocketNotifier(inbox.fileno(), QSocketNotifier.Type.Read).activated.connect(
        inbox.run_pending
    )  # Qt
    loop.add_reader(inbox.fileno(), inbox.run_pending)  # asyncio

    supervisor.on_event(inbox.wrap(window.show_state))  # show_state runs on the GUI thread
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["Inbox"]


class Inbox:
    """A queue of calls for one thread, with a descriptor readable while calls wait.

    :meth:`post` never blocks and never fails (after :meth:`close` it drops
    the call), so it is safe from a supervisor's loop thread at any time,
    also while the GUI thread is shutting down.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._lock = threading.Lock()
        self._calls: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._closed = False

    def post(self, fn: Callable[..., object], /, *args: Any) -> None:
        """Queue ``fn(*args)`` for the thread that runs :meth:`run_pending`; any thread."""
        with self._lock:
            if self._closed:
                return
            wake = not self._calls  # one byte per batch: the reader takes the whole queue
            self._calls.append((fn, args))
            if wake:
                # a full pipe is already readable: nothing is lost
                with contextlib.suppress(BlockingIOError):
                    os.write(self._write, b"\0")

    def wrap(self, fn: Callable[..., object]) -> Callable[..., None]:
        """``fn``, called through this inbox: pass it as a library callback."""

        def posted(*args: Any) -> None:
            self.post(fn, *args)

        return posted

    def fileno(self) -> int:
        """Readable while calls wait (watch it with the toolkit's file handler)."""
        return self._read

    def run_pending(self, *_: object) -> int:
        """Run the queued calls in order, on the calling thread; returns how many ran.

        Extra arguments (what a toolkit's file callback passes) are ignored. If
        a call raises, the ones after it stay queued (and the descriptor
        readable) and the exception propagates to the toolkit's handler.
        """
        with self._lock:
            if self._closed:
                return 0
            # wake-up bytes first, then the queue: a call posted between the two
            # finds the queue non-empty and is taken with it
            with contextlib.suppress(BlockingIOError):
                while os.read(self._read, 4096):
                    pass
            calls, self._calls = self._calls, deque()
        ran = 0
        while calls:
            fn, args = calls.popleft()
            try:
                fn(*args)
            except BaseException:
                self._requeue(calls)
                raise
            ran += 1
        return ran

    def _requeue(self, calls: deque[tuple[Callable[..., object], tuple[Any, ...]]]) -> None:
        with self._lock:
            if self._closed or not calls:
                return
            self._calls = calls + self._calls
            with contextlib.suppress(BlockingIOError):
                os.write(self._write, b"\0")

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._calls)

    def close(self) -> None:
        """Drop what is queued and close the descriptors; later posts are ignored."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._calls.clear()
            os.close(self._read)
            os.close(self._write)

    def __enter__(self) -> Inbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
