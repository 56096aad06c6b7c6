"""No process a test starts may outlive it: a check over the whole session.

Before any test runs, ``LLAMACTL_TEST_SESSION`` is set to a value unique to
this pytest run, so every process a test starts inherits it: a CLI, a
llama-server, the daemon, cmake, ninja and each compiler. Scanning processes
by that value finds them even when they are no longer pytest's children
(``start_new_session``, a daemon that detached, ninja in its own session, an
orphan adopted by init), which walking the process tree does not.

After each test, a process still carrying the value (zombies aside, and given
a few seconds to finish exiting) is a leak: it is killed, by its pid, and the
test errors with its pid and command line. A module- or session-scoped
fixture that keeps a process across tests starts it with :func:`shared_env`,
whose value only the final scan looks for. That scan runs when the session
ends (after every fixture is torn down) and fails the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

MARK = "LLAMACTL_TEST_SESSION"
#: how long a process that is still exiting when its test ends gets before it is a leak
EXIT_GRACE = 3.0
_TOKEN = uuid.uuid4().hex


def pytest_configure(config: pytest.Config) -> None:
    os.environ[MARK] = _TOKEN
    # Tests press Ctrl-C (SIGINT) on the CLIs they start. A shell starts a background
    # job with SIGINT ignored, every child inherits that, and Python then never raises
    # KeyboardInterrupt: a test run launched with '&' would see CLIs ignore the key.
    # Python's handler here makes each child start with the default disposition.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def shared_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) for a process a wider-scoped fixture keeps across tests."""
    return {**(os.environ if env is None else env), MARK: f"{_TOKEN}:shared"}


def _carries_mark(pid: int, values: tuple[str, ...] = (_TOKEN,)) -> bool:
    if sys.platform.startswith("linux"):
        # a raw read: ~2 ms for every process on the machine, cheap enough after each test.
        # A zombie's environ reads empty, so zombies never match.
        try:
            data = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        entries = data.split(b"\0")
        return any(f"{MARK}={value}".encode() in entries for value in values)
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(MARK) in values
    except psutil.Error:
        return False


def _describe(pid: int) -> str:
    try:
        proc = psutil.Process(pid)
        return f"pid {pid}: {' '.join(proc.cmdline()) or proc.name()}"
    except psutil.Error:
        return f"pid {pid}"


def started_here(values: tuple[str, ...] = (_TOKEN,)) -> dict[int, str]:
    """Live processes started during this session (pytest itself aside): pid -> what it runs."""
    me = os.getpid()
    return {
        pid: _describe(pid) for pid in psutil.pids() if pid != me and _carries_mark(pid, values)
    }


def leaked(grace: float = EXIT_GRACE, *, shared: bool = False) -> dict[int, str]:
    """What is still running after ``grace`` seconds, then killed (SIGKILL, by pid); with
    ``shared``, what wider-scoped fixtures started too."""
    values = (_TOKEN, f"{_TOKEN}:shared") if shared else (_TOKEN,)
    found = started_here(values)
    deadline = time.monotonic() + grace
    while found and time.monotonic() < deadline:
        time.sleep(0.05)
        found = {pid: what for pid, what in found.items() if _carries_mark(pid, values)}
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return found


def _report(found: dict[int, str], when: str) -> str:
    lines = "\n".join(f"  {what}" for what in found.values())
    return f"{len(found)} process(es) left running {when} (killed now):\n{lines}"


@pytest.fixture(autouse=True)
def _no_process_left_behind() -> Iterator[None]:
    yield
    if found := leaked():
        pytest.fail(_report(found, "after this test"), pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if found := leaked(shared=True):
        message = _report(found, "at the end of the test session")
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_sep("=", "processes left behind", red=True)
            reporter.write_line(message)
        else:
            print(message, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
