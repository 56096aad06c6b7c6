"""Stopping a build from another thread: the token a desktop app's Cancel button sets.

A compile runs for minutes in a thread of its own; closing the window must
end it at once, not after the next object file. The token keeps the actions
that stop the work in progress (kill cmake's process group, stop waiting
for a lock) and runs them the moment it is cancelled::

    token = CancelToken()
    remove = token.on_cancel(lambda: os.killpg(proc.pid, signal.SIGTERM))
    ...
    remove()                     # the step ended on its own
    token.raise_if_cancelled()   # BuildCancelled, if that is why it ended
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from buildtools.errors import BuildCancelled

__all__ = ["CancelToken"]


class CancelToken:
    """Set once, from any thread; runs the registered stop actions when it is."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._actions: list[Callable[[], object]] = []

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        """Cancel: each stop action runs once, now, in the caller's thread; idempotent."""
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            actions, self._actions = self._actions, []
        for action in actions:
            action()

    def on_cancel(self, action: Callable[[], object]) -> Callable[[], None]:
        """Run ``action`` on cancellation (at once if already cancelled); returns its remover."""
        with self._lock:
            if not self._event.is_set():
                self._actions.append(action)
                registered = True
            else:
                registered = False
        if not registered:
            action()

        def remove() -> None:
            with self._lock:
                if action in self._actions:
                    self._actions.remove(action)

        return remove

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds or until cancelled; True if cancelled."""
        return self._event.wait(timeout)

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise BuildCancelled("the build was cancelled", hint="start it again to resume it")
