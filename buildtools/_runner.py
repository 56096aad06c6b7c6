"""The one way llamactl runs short external commands.

``capture`` runs a command to completion and returns its output (probes,
``--version`` queries); it never raises for a missing program or a non-zero
exit, because a failed probe must degrade, not crash. Long-lived processes
(the compile, the servers) have their own owners.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Completed", "Runner", "capture", "describe_exit"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completed:
    """What a finished command left behind."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class Runner(Protocol):
    """Anything that can run a short command; probes take one as argument."""

    def __call__(
        self,
        args: Sequence[str],
        *,
        timeout: float = ...,
        env: Mapping[str, str] | None = ...,
    ) -> Completed: ...


#: returncode used when the program could not be started at all
NOT_FOUND = 127
#: returncode used when the command outran its timeout
TIMED_OUT = 124


def capture(
    args: Sequence[str],
    *,
    timeout: float = 20.0,
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Run ``args`` and capture its output; never raises for command failure."""
    argv = tuple(str(a) for a in args)
    log.debug("run: %s", shlex.join(argv))
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=None if env is None else {**os.environ, **env},
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        return Completed(argv, NOT_FOUND, "", str(exc))
    except PermissionError as exc:
        return Completed(argv, NOT_FOUND, "", str(exc))
    except subprocess.TimeoutExpired:
        return Completed(argv, TIMED_OUT, "", f"timed out after {timeout:.0f} s")
    return Completed(argv, proc.returncode, proc.stdout, proc.stderr)


def describe_exit(code: int | None) -> str:
    """``exit status 1``, ``SIGKILL``, ``SIGILL (illegal instruction...)``."""
    if code is None:
        return "still running"
    if code >= 0:
        return f"exit status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"
    if -code == signal.SIGILL:
        return f"{name} (illegal instruction: built for another CPU?)"
    if -code == signal.SIGKILL:
        return f"{name} (killed: out of memory, or by someone)"
    return name
