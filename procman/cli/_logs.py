"""``llamactl logs``: a served model's llama-server log, or the log of a worker."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Annotated

import typer

from buildtools.errors import LlamactlError
from procman.cli._app import app

__all__ = ["logs"]


@app.command()
def logs(
    name: Annotated[
        str, typer.Argument(help="The server's name (as `serve` printed it, e.g. demo).")
    ],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing what is appended.")
    ] = False,
    lines: Annotated[
        int, typer.Option("--lines", "-n", help="How many of the last lines to print.")
    ] = 50,
) -> None:
    """Print a served model's llama-server log (stdout and stderr)."""
    from procman.process.logs import follow as follow_log  # speed
    from procman.process.logs import log_path, read_tail  # speed

    path = log_path(name)
    if not path.is_file():
        known = sorted(p.name.removesuffix(".log") for p in path.parent.glob("*.log"))
        raise LlamactlError(
            f"no log for {name!r} (looked for {path})",
            hint=f"logs exist for: {', '.join(known)}" if known else "nothing has been served yet",
        )
    if not follow:
        for line in read_tail(path, lines):
            sys.stdout.write(line + "\n")
        return

    async def tail_forever() -> None:
        async for text in follow_log(path, lines=lines):
            sys.stdout.write(text)
            sys.stdout.flush()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(tail_forever())
