"""Rich progress bars drawn only once there is progress: the build's (ninja's [n/m]), and
the base a pull's bar shares (``procman.cli._models.PullView``)."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Self, cast

from procman.cli._app import console

if TYPE_CHECKING:  # rich.progress costs ~30 ms at start; most runs never draw a bar
    from rich.progress import Progress, ProgressColumn, TaskID

    from buildtools import BuildProgress


class LazyBar:
    """Use as a context manager and pass the instance as ``on_progress``.

    Nothing is drawn until the first report arrives (:meth:`_start`), so wrapping
    a call that ends up a cache hit (or needs no work at all) prints nothing.
    """

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._task = cast("TaskID", 0)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _start(
        self,
        *columns: ProgressColumn,
        description: str,
        total: float | None,
        transient: bool = False,
    ) -> Progress:
        from rich.progress import Progress  # speed

        self._progress = Progress(*columns, console=console, transient=transient)
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)
        return self._progress


class BuildProgressView(LazyBar):
    """The build's bar: configuring, compiling n/m, verifying."""

    def __init__(self, announce: str | None = None) -> None:
        super().__init__()
        self._announce = announce

    def __call__(self, p: BuildProgress) -> None:
        if p.stage == "done":
            return
        progress = self._progress
        if progress is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )  # speed

            if self._announce:
                console.print(self._announce)
            progress = self._start(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                description="configuring…",
                total=None,
                transient=True,
            )
        if p.stage == "compile" and p.total:
            progress.update(self._task, description="compiling", completed=p.done, total=p.total)
        elif p.stage == "verify":
            progress.update(self._task, description="verifying on the demo model")
