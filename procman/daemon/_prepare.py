"""``procman.prepare()``: a verified llama-server and the model file, before the first serve.

On a new machine the first ``serve`` would block for the whole compile of
llama-server (about ten minutes on two cores) with nothing to show. An app
calls :func:`prepare` at start instead: the work runs in a thread of its own,
reports each step as a :class:`Progress` (the compile's percentage among
them), and :meth:`Preparation.cancel` stops it at once (the compiler's
process group is killed, the wait for another builder's lock ends; the
build tree is kept, so the next start resumes the compile)::

    preparation = procman.prepare("demo", on_progress=inbox.wrap(window.show_progress))
    preparation.add_done_callback(inbox.wrap(window.prepared))
    ...
    preparation.cancel()  # the window was closed

When it is done, ``serve`` (of :class:`procman.Supervisor` or of the shared
daemon) finds the build in the cache and starts in about a second.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from buildtools.cancel import CancelToken

if TYPE_CHECKING:
    from buildtools.builder import BuildProgress

__all__ = ["Preparation", "Prepared", "Progress", "prepare"]

#: how long interpreter exit waits for a cancelled build to stop
_EXIT_GRACE = 15.0


@dataclass(frozen=True, kw_only=True)
class Progress:
    """One step of getting ready, as a progress bar shows it."""

    stage: str
    """``model`` (finding or fetching the model file), ``build`` (the server), ``ready``."""
    step: str = ""
    """Within ``build``: ``waiting`` (another process builds the same plan),
    ``configure``, ``compile``, ``verify``, ``done``. Within ``model``: ``resolve``, ``done``."""
    done: int = 0
    total: int = 0
    """Units of work (compile steps) done and in all; 0 and 0 when not countable."""
    message: str = ""

    @property
    def fraction(self) -> float | None:
        """``done / total``, or None when the step cannot be counted (a busy indicator)."""
        return self.done / self.total if self.total else None


@dataclass(frozen=True, kw_only=True)
class Prepared:
    """What :func:`prepare` made sure of."""

    model: Path
    binary: Path
    origin: str
    """Where the server comes from (``cache``, ``built``, ``env``, ``path``...)."""
    built: bool
    """Whether it was compiled by this call."""


def build_progress(progress: BuildProgress) -> Progress:
    """A build step, as :class:`Progress` (pure: the compile's ``[done/total]`` counts)."""
    return Progress(
        stage="build",
        step=progress.stage,
        done=progress.done,
        total=progress.total,
        message=progress.line,
    )


class Preparation:
    """:func:`prepare`'s work in its own thread: wait for it, cancel it, or be called back."""

    def __init__(
        self,
        model: str,
        *,
        binary: str | None,
        build: bool,
        on_progress: Callable[[Progress], object] | None,
    ) -> None:
        self.model = model
        self._token = CancelToken()
        self._future: concurrent.futures.Future[Prepared] = concurrent.futures.Future()
        self._report = on_progress or (lambda _: None)
        self._binary = binary
        self._build = build
        # interpreter exit cancels it: a daemon thread would otherwise leave cmake running
        atexit.register(self._at_exit)
        self._thread = threading.Thread(target=self._run, name="procman-prepare", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._future.set_running_or_notify_cancel()
        try:
            result = self._work()
        except BaseException as exc:  # handed to whoever waits, as the error it was
            self._future.set_exception(exc)
        else:
            self._future.set_result(result)
        finally:
            atexit.unregister(self._at_exit)

    def _work(self) -> Prepared:
        import buildtools  # speed: the build layer, only when preparing
        from procman.models.refs import resolve_model  # speed

        self._report(Progress(stage="model", step="resolve", message=f"finding {self.model}"))
        model = resolve_model(self.model)
        self._report(Progress(stage="model", step="done", message=str(model)))
        self._token.raise_if_cancelled()
        server = buildtools.resolve_server(
            self._binary,
            build_if_missing=self._build,
            on_progress=self._build_step,
            cancel=self._token,
        )
        self._token.raise_if_cancelled()
        self._report(Progress(stage="ready", message=f"{server.binary} ({server.reason})"))
        return Prepared(
            model=model, binary=server.binary, origin=server.origin, built=server.origin == "built"
        )

    def _build_step(self, progress: BuildProgress) -> None:
        self._report(build_progress(progress))

    def cancel(self) -> None:
        """Stop the work now (from any thread); :meth:`result` then raises ``BuildCancelled``."""
        self._token.cancel()

    @property
    def cancelled(self) -> bool:
        return self._token.cancelled

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Prepared:
        """Wait for it; raises what it failed with (``BuildError``, ``ModelError``...)."""
        return self._future.result(timeout)

    def add_done_callback(self, callback: Callable[[Preparation], object]) -> None:
        """Call ``callback(self)`` when done (from the preparing thread, or now if done)."""
        self._future.add_done_callback(lambda _: callback(self))

    def _at_exit(self) -> None:
        self.cancel()
        self._thread.join(_EXIT_GRACE)


def prepare(
    model: str = "demo",
    *,
    binary: str | None = None,
    build: bool = True,
    on_progress: Callable[[Progress], object] | None = None,
) -> Preparation:
    """Make sure ``model`` is on disk and a verified llama-server exists, in the background.

    ``binary`` is resolved as ``serve`` resolves it (an explicit path,
    ``$LLAMACTL_SERVER``, the cache, the wheel, ``PATH``); when none is found
    and ``build`` is true, the default plan is compiled into the cache.
    ``on_progress`` is called from the preparing thread (wrap it with
    :meth:`procman.Inbox.wrap` for a GUI).
    """
    return Preparation(model, binary=binary, build=build, on_progress=on_progress)
