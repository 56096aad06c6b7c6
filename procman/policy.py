"""The restart policy: a pure object fed with what happened, returning what to do.

It knows nothing of processes or clocks: the caller passes ``now`` (any
monotonic seconds) with each observation, which is what makes every rule
testable with plain numbers. The rules:

* a crash (exit, kill after a hang, failed health) is remembered for
  ``window`` seconds;
* the n-th remembered crash is answered with a restart after
  ``backoff_initial * backoff_factor**(n-1)`` seconds, capped at
  ``backoff_max``;
* one crash more than ``max_restarts`` within the window means give up:
  the server goes to ``failed`` instead of looping forever. A server that
  stays up longer than the window has a clean slate again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from procman.spec import RestartSettings

__all__ = ["Action", "Decision", "RestartPolicy"]


class Action(StrEnum):
    RESTART = "restart"
    GIVE_UP = "give_up"


@dataclass(frozen=True, kw_only=True)
class Decision:
    action: Action
    delay: float
    """Seconds to wait before restarting (0 when giving up)."""
    attempt: int
    """How many crashes the window holds, this one included."""
    reason: str


class RestartPolicy:
    """Decides, crash by crash, between a delayed restart and giving up."""

    def __init__(self, settings: RestartSettings | None = None) -> None:
        self.settings = settings or RestartSettings()
        self._crashes: deque[float] = deque()

    def _forget_before(self, now: float) -> None:
        while self._crashes and self._crashes[0] <= now - self.settings.window:
            self._crashes.popleft()

    @property
    def recent_crashes(self) -> int:
        return len(self._crashes)

    def on_crash(self, now: float, reason: str) -> Decision:
        """A server died or was killed at ``now`` for ``reason``: restart it, or not."""
        s = self.settings
        self._forget_before(now)
        self._crashes.append(now)
        attempt = len(self._crashes)
        if attempt > s.max_restarts:
            return Decision(
                action=Action.GIVE_UP,
                delay=0.0,
                attempt=attempt,
                reason=f"{reason}; {attempt} crashes within {s.window:g} s, giving up",
            )
        delay = min(s.backoff_max, s.backoff_initial * s.backoff_factor ** (attempt - 1))
        return Decision(
            action=Action.RESTART,
            delay=delay,
            attempt=attempt,
            reason=f"{reason}; restart {attempt}/{s.max_restarts} in {delay:.1f} s",
        )

    def on_ready(self, now: float) -> None:
        """The server became ready: crashes older than the window no longer count."""
        self._forget_before(now)

    def reset(self) -> None:
        self._crashes.clear()
