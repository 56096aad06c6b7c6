"""``serve --config`` without restarts: its reloads (``SIGHUP``, ``--watch``,
``POST /admin/reload``) and how they are printed.

All three go through one :class:`~procman.reload.Reloader`, so they do the
same thing and are printed the same way: a summary line, then one ``reload``
event per model (which ``--log-format json`` writes as records). A refused
reload is printed with its reason and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from procman.cli._logfmt import OUTPUT
from procman.errors import LlamactlError
from procman.reload._watch import watch
from procman.reload.apply import Loaded, Reloader

if TYPE_CHECKING:
    from procman.reload.report import ReloadReport
    from procman.router import Router, Scheduler
    from procman.supervisor import AsyncSupervisor

__all__ = ["LiveConfig", "go_live"]


@dataclass(frozen=True, kw_only=True)
class LiveConfig:
    """What ``serve --config`` needs to reload its file."""

    file: Path
    load: Callable[[], Loaded]
    """Reads, validates and resolves the file as at launch (command-line overrides
    included); raises :class:`LlamactlError` to refuse."""
    current: Loaded
    watch: bool = False


def _printed(report: ReloadReport) -> None:
    OUTPUT.say("reload", f"[bold]{escape(report.summary())}[/]", report=report.to_json())


def _refused(exc: LlamactlError) -> None:
    hint = f" ({exc.hint})" if exc.hint else ""
    message = f"reload refused, nothing changed: {exc.message}{hint}"
    OUTPUT.say("reload", f"[bold red]{escape(message)}[/]", level="error")


async def go_live(
    live: LiveConfig, supervisor: AsyncSupervisor, scheduler: Scheduler, router: Router
) -> Callable[[], Awaitable[None]]:
    """Wire the reloads up; returns what undoes it (before the router and servers stop)."""
    reloader = Reloader(
        file=live.file,
        load=live.load,
        current=live.current,
        supervisor=supervisor,
        scheduler=scheduler,
        guard=router.guard,
        on_report=_printed,
        on_refused=_refused,
    )
    tasks: set[asyncio.Task[Any]] = set()

    async def quietly(why: str) -> None:  # printed by the callbacks; a refusal ends nothing
        OUTPUT.say("reload", f"{why}: reloading {escape(str(live.file))}")
        with contextlib.suppress(LlamactlError):
            await reloader.reload()

    def on_hangup() -> None:
        task = asyncio.create_task(quietly("SIGHUP"), name="llamactl-reload")
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def as_json() -> dict[str, Any]:
        return (await reloader.reload()).to_json()

    router.reload = as_json
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    if live.watch:
        changed = watch(live.file, lambda: quietly("the file changed"))
        tasks.add(asyncio.create_task(changed, name="llamactl-watch"))

    async def close() -> None:
        loop.remove_signal_handler(signal.SIGHUP)
        router.reload = None
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    return close
