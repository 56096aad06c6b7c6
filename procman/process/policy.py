"""The restart policy: a pure object fed with what happened, returning what to do.

It knows nothing of processes or clocks: the caller passes ``now`` (any
monotonic seconds) with each observation, which is what makes every rule
testable with plain numbers. The rules, for a server that has been ready
(one whose first start fails is reported at once: its model or arguments
are wrong, and no restart would fix that):

* every end it did not ask for is followed by a restart, after
  ``backoff_initial * backoff_factor**(n-1)`` seconds (capped at
  ``backoff_max``), n being the ends remembered in the last ``window``
  seconds: however a server keeps dying, it is never restarted faster;
* a **crash** counts towards giving up: a fatal signal, a non-zero exit, a
  hang (killed after failed health checks), a memory-limit recycle, and a
  SIGKILL from outside (the kernel's OOM killer looks the same as a user's
  ``kill -9``, and an OOM kill repeats). An end that is not a crash (exit
  status 0, or SIGTERM/SIGINT/SIGHUP from outside: someone stopped it on
  purpose) is restarted but never counted, so nobody else's signals can
  fail a model;
* one crash more than ``max_restarts`` within the window: the server is
  ``failed`` for ``cooldown`` seconds, during which requests get 503 with
  ``Retry-After``; after it, the next request starts the model again. So a
  handful of requests that crash llama-server cannot lock a model out for
  good, and a model that crashes at every start costs one start per
  cooldown, not a loop;
* a server that stays up longer than the window starts afresh.
"""

from __future__ import annotations

import signal
from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from procman.spec import RestartSettings

__all__ = ["Action", "Decision", "RestartPolicy", "is_crash"]

#: signals by which someone stops a process on purpose (SIGKILL is not one: see above)
_STOPS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def is_crash(returncode: int) -> bool:
    """Whether an exit status (negative: the signal) counts as a crash (see the module doc)."""
    if returncode == 0:
        return False
    return returncode > 0 or -returncode not in _STOPS


class Action(StrEnum):
    RESTART = "restart"
    GIVE_UP = "give_up"


@dataclass(frozen=True, kw_only=True)
class Decision:
    action: Action
    delay: float
    """Seconds to wait before restarting; when giving up, before a request may retry."""
    attempt: int
    """How many ends the window holds, this one included."""
    reason: str


class RestartPolicy:
    """Decides, end by end, between a delayed restart and giving up for a while."""

    def __init__(self, settings: RestartSettings | None = None) -> None:
        self.settings = settings or RestartSettings()
        self._ends: deque[tuple[float, bool]] = deque()  # (when, a crash)

    def _forget_before(self, now: float) -> None:
        while self._ends and self._ends[0][0] <= now - self.settings.window:
            self._ends.popleft()

    @property
    def recent_crashes(self) -> int:
        return sum(crash for _, crash in self._ends)

    def on_crash(self, now: float, reason: str, *, crash: bool = True) -> Decision:
        """A server ended at ``now`` for ``reason`` (``crash``: it counts, see the module
        doc): restart it, or give up for ``cooldown`` seconds."""
        s = self.settings
        self._forget_before(now)
        self._ends.append((now, crash))
        attempt, crashes = len(self._ends), self.recent_crashes
        if crash and crashes > s.max_restarts:
            return Decision(
                action=Action.GIVE_UP,
                delay=s.cooldown,
                attempt=attempt,
                reason=f"{reason}; {crashes} crashes within {s.window:g} s: failed, "
                f"the next request after {s.cooldown:g} s starts it again",
            )
        delay = min(s.backoff_max, s.backoff_initial * s.backoff_factor ** (attempt - 1))
        counted = f"restart {crashes}/{s.max_restarts}" if crash else "restart (not a crash)"
        return Decision(
            action=Action.RESTART,
            delay=delay,
            attempt=attempt,
            reason=f"{reason}; {counted} in {delay:.1f} s",
        )

    def on_ready(self, now: float) -> None:
        """The server became ready: ends older than the window no longer count."""
        self._forget_before(now)

    def reset(self) -> None:
        self._ends.clear()
