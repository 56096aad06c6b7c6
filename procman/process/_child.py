"""Process hygiene for long-lived children: own group, dies with us, polite then firm stop.

What each OS gets:

* every server runs in its own session and process group
  (``start_new_session``), so a terminal's Ctrl-C reaches llamactl only (which
  then stops its servers in order), and stopping signals the whole group:
  SIGTERM, a grace period, then SIGKILL;
* on Linux the child asks the kernel for SIGKILL when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``), so even ``kill -9`` of llamactl leaves no
  server behind. It re-checks ``getppid()`` right after, closing the race
  in which the parent dies between ``fork`` and ``prctl``. PDEATHSIG follows
  the *thread* that forked, not the process: asyncio forks from the event
  loop's thread, so run the event loop in a thread that lives as long as the
  servers (the main thread, or one dedicated thread in a desktop app), never
  in a short-lived worker thread;
* macOS and other POSIX systems have no PDEATHSIG: a clean exit, Ctrl-C or
  SIGTERM still stops every server, but after a SIGKILL of llamactl its
  servers keep running until stopped by hand (their pids are in the events
  and at the top of each run in the log). Windows is not supported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from buildtools._runner import describe_exit
from procman.process._pdeathsig import child_setup
from procman.process.logs import LineTail, RotatingLog

if TYPE_CHECKING:
    from procman.process._early import EarlyServer

__all__ = ["Child", "adopt", "describe_exit", "spawn", "terminate", "within"]

log = logging.getLogger(__name__)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # the group outlives a reaped leader only while members remain, and the
    # kernel never reuses a pid that still names a group, so this is safe
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def within(future: asyncio.Future[Any], seconds: float) -> bool:
    """Whether ``future`` is done within ``seconds`` (it is never cancelled)."""
    if not future.done():
        await asyncio.wait({future}, timeout=max(0.0, seconds))
    return future.done()


_LISTENING = b"listening on"
#: once a server listens, its output is read at most this often: llama-server logs
#: ~6 lines per request, and a read plus a log write for each cost ~0.2 ms of
#: CPU per request under load; resting between reads lets them arrive as one
LOG_REST = 0.02


class Child(asyncio.SubprocessProtocol):
    """Pipes the child's output into the log and the tail; resolves when it exits.

    Until the server listens every read is taken at once (readiness is
    noticed in the output); after that, the pipe rests :data:`LOG_REST`
    seconds after each read, so a burst of lines is read and written in one
    go. The pipe is read again at once when the process exits.
    """

    def __init__(self, sink: RotatingLog, tail: LineTail) -> None:
        loop = asyncio.get_running_loop()
        self.sink = sink
        self.tail = tail
        self.exited: asyncio.Future[int] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        #: resolves when the output says the HTTP port is open (llama-server prints
        #: "listening on http://..." once the model is loaded): the loading poll
        #: probes at once instead of at its next tick
        self.listening: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.SubprocessTransport | None = None
        self._write_failed = False
        self._last = b""
        self._resting: asyncio.ReadTransport | None = None
        self._rest_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # no isinstance check: uvloop's process transport has the interface but
        # does not subclass asyncio.SubprocessTransport
        self.transport = cast("asyncio.SubprocessTransport", transport)

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.tail.feed(data)
        if not self.listening.done():
            if _LISTENING in self._last + data:  # the phrase may straddle two reads
                self.listening.set_result(None)
            self._last = data[-len(_LISTENING) :]
        try:
            self.sink.write(data)
        except OSError as exc:  # a full disk must not take the server down with it
            if not self._write_failed:
                log.warning("cannot write log %s: %s", self.sink.path, exc)
            self._write_failed = True
        if self.listening.done() and self._resting is None and not self.exited.done():
            self._rest(fd)

    def _rest(self, fd: int) -> None:
        found = self.transport.get_pipe_transport(fd) if self.transport is not None else None
        # duck-typed: uvloop's pipe transports do not subclass asyncio.ReadTransport
        if found is None or not hasattr(found, "pause_reading") or found.is_closing():
            return
        pipe = cast("asyncio.ReadTransport", found)
        pipe.pause_reading()
        self._resting = pipe
        self._rest_timer = asyncio.get_running_loop().call_later(LOG_REST, self._wake)

    def _wake(self) -> None:
        pipe, self._resting = self._resting, None
        if self._rest_timer is not None:
            self._rest_timer.cancel()
            self._rest_timer = None
        if pipe is not None and not pipe.is_closing():
            pipe.resume_reading()

    async def pause_loading(self, seconds: float) -> bool:
        """Sleep between loading polls: *seconds*, or less once it listens; True if it exited."""
        wake: set[asyncio.Future[Any]] = {self.exited}
        if not self.listening.done():
            wake.add(self.listening)
        await asyncio.wait(wake, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        return self.exited.done()

    def process_exited(self) -> None:
        if self.transport is not None and not self.exited.done():
            code = self.transport.get_returncode()
            self.exited.set_result(-1 if code is None else code)
        self._wake()  # its last words (a crash's reason) reach the log and the tail now

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def spawn(
    argv: Sequence[str],
    sink: RotatingLog,
    tail: LineTail,
    *,
    ignore_sigpipe: bool = False,
    env: Mapping[str, str] | None = None,
) -> tuple[asyncio.SubprocessTransport, Child]:
    """Start ``argv`` in its own session, tied to our life, its output piped to ``sink``.

    Must run in the event loop's thread (asyncio forks there): see the module
    docstring on PDEATHSIG. ``ignore_sigpipe``: see
    :func:`~procman.process._pdeathsig.child_setup`.
    """
    loop = asyncio.get_running_loop()
    return await loop.subprocess_exec(
        lambda: Child(sink, tail),
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
        # only prctl + getppid run between fork and exec (PLW1509 is not in our selection)
        preexec_fn=child_setup(ignore_sigpipe=ignore_sigpipe),
    )


class _PipeToChild(asyncio.Protocol):
    """Feeds an adopted process's output pipe to its :class:`Child`."""

    def __init__(self, child: Child) -> None:
        self.child = child

    def data_received(self, data: bytes) -> None:
        self.child.pipe_data_received(1, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.child.connection_lost(exc)


class _AdoptedTransport:
    """What :func:`terminate` and the server use of a process transport, for an early process.

    Its exit is seen through a pidfd (readable once the process exits) in the
    event loop, so there is no thread and no waitpid on anything but its pid.
    """

    def __init__(self, early: EarlyServer, pipe: asyncio.ReadTransport | None) -> None:
        self._early = early
        self._pipe = pipe

    def get_pid(self) -> int:
        return self._early.process.pid

    def get_returncode(self) -> int | None:
        return self._early.process.returncode

    def get_pipe_transport(self, fd: int) -> asyncio.ReadTransport | None:
        return self._pipe if fd == 1 else None

    def close(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
        if self._early.pidfd >= 0:
            asyncio.get_running_loop().remove_reader(self._early.pidfd)
            os.close(self._early.pidfd)
            self._early.pidfd = -1


async def adopt(
    early: EarlyServer, sink: RotatingLog, tail: LineTail
) -> tuple[asyncio.SubprocessTransport, Child]:
    """Take over a process :mod:`procman.process._early` started: as :func:`spawn`
    returns, from then on.

    Its output so far waited in its pipe and reaches ``sink`` first.
    """
    loop = asyncio.get_running_loop()
    child = Child(sink, tail)
    pipe = None
    if early.process.stdout is not None:
        try:
            pipe, _ = await loop.connect_read_pipe(
                lambda: _PipeToChild(child), early.process.stdout
            )
        except BaseException:  # cancelled (Ctrl-C while starting): nobody owns it yet
            early.discard()
            raise
    transport = _AdoptedTransport(early, pipe)
    child.connection_made(cast("asyncio.BaseTransport", transport))
    early.adopted = True

    def check_exit() -> None:
        if early.process.poll() is not None:
            loop.remove_reader(early.pidfd)
            child.process_exited()

    loop.add_reader(early.pidfd, check_exit)
    check_exit()  # it may have exited already
    return cast("asyncio.SubprocessTransport", transport), child


async def terminate(
    transport: asyncio.SubprocessTransport, child: Child, grace: float, name: str = ""
) -> None:
    """SIGTERM the group, wait the grace period, SIGKILL the group, reap, close pipes."""
    pid = transport.get_pid()
    try:
        if not child.exited.done():
            _signal_group(pid, signal.SIGTERM)
            await within(child.exited, grace)
    finally:
        # always: the leader if it outlived its grace, and any other member of its group
        _signal_group(pid, signal.SIGKILL)
        try:
            if not await within(child.exited, 10.0):
                log.error("%s: pid %d survived SIGKILL for 10 s", name, pid)
            await within(child.closed, 1.0)  # the last output reaches the log
        finally:
            transport.close()
