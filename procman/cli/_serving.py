"""What both ways of ``llamactl serve`` share: the API key, signals, and what they print."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

from rich.markup import escape

from buildtools.errors import LlamactlError
from procman.cli._logfmt import OUTPUT

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from procman.events import Event
    from procman.router import Router
    from procman.supervisor import AsyncSupervisor

__all__ = ["catch_signals", "chosen_key", "forget_signals", "print_budget", "print_event", "url"]


def chosen_key(api_key: str | None, key_file: str | None) -> str | None:
    """The API key, given or read from ``key_file`` (both: they must agree)."""
    if key_file is None:
        return api_key
    from procman.config import read_key_file  # speed

    key = read_key_file(key_file)
    if api_key is not None and api_key != key:
        raise LlamactlError(
            f"an API key and the API key file {key_file} were given, and they differ",
            hint="pass one of them (is LLAMACTL_API_KEY set in this environment?)",
        )
    return key


def url(router: Router, path: str = "/v1") -> str:
    """Where clients reach the router: its OpenAI base URL, or ``path`` (``/ui``)."""
    host, port = router.address or ("?", 0)
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"


def print_budget(supervisor: AsyncSupervisor) -> None:
    from procman._units import format_bytes  # speed

    budget = supervisor.limits.budget
    parts = []
    for what, size, why in (
        ("memory", budget.memory_bytes, budget.memory_reason),
        ("VRAM", budget.vram_bytes, budget.vram_reason),
    ):
        shown = "unlimited" if size is None else format_bytes(size)
        parts.append(f"{what} {shown} [dim]({escape(why)})[/]")
    OUTPUT.say("budget", f"[dim]budget:[/] {'; '.join(parts)}")


def print_event(event: Event) -> None:
    OUTPUT.event(event)


def catch_signals(loop: asyncio.AbstractEventLoop, handler: Callable[[], None]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handler)


def forget_signals(loop: asyncio.AbstractEventLoop) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
