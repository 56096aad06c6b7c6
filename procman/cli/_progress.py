"""A rich progress bar fed by the build's real progress (ninja's [n/m])."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, cast

from procman.cli._app import console

if TYPE_CHECKING:  # rich.progress costs ~30 ms at start; most runs never draw a bar
    from rich.progress import Progress, TaskID

    from buildtools import BuildProgress


class BuildProgressView:
    """Use as a context manager and pass the instance as ``on_progress``.

    Nothing is drawn until the first event arrives, so wrapping a call that
    ends up a cache hit (or needs no build at all) prints nothing.
    """

    def __init__(self, announce: str | None = None) -> None:
        self._announce = announce
        self._progress: Progress | None = None
        self._task = cast("TaskID", 0)

    def __enter__(self) -> BuildProgressView:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, p: BuildProgress) -> None:
        if p.stage == "done":
            return
        if self._progress is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )  # speed

            if self._announce:
                console.print(self._announce)
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("configuring…", total=None)
        if p.stage == "compile" and p.total:
            self._progress.update(
                self._task, description="compiling", completed=p.done, total=p.total
            )
        elif p.stage == "verify":
            self._progress.update(self._task, description="verifying on the demo model")
