"""``llamactl logs``: a served model's llama-server log, or the log of a worker.

Read from this machine's log folder, or with ``--url`` from a running
router's ``/admin/logs/NAME`` (another machine, another user's
``LLAMACTL_HOME``), with ``$LLAMACTL_API_KEY`` as the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Annotated

import typer

from buildtools.errors import LlamactlError
from procman.cli._app import app
from procman.cli._ctl import open_admin

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
    url: Annotated[
        str | None,
        typer.Option(
            help="Read it from this router's admin API instead of this machine's files.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print a served model's llama-server log (stdout and stderr)."""
    if url is not None:
        _from_router(url, name, follow=follow, lines=lines)
        return
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


def _from_router(url: str, name: str, *, follow: bool, lines: int) -> None:
    """``GET /admin/logs/NAME``: the text, or followed as server-sent events."""
    from urllib.parse import quote  # speed

    path = f"/admin/logs/{quote(name, safe='')}?lines={max(lines, 0)}"
    if not follow:
        with open_admin(url, "GET", path, timeout=30) as response:
            sys.stdout.write(response.read().decode("utf-8", "replace"))
        return
    with (
        contextlib.suppress(KeyboardInterrupt),
        open_admin(url, "GET", f"{path}&follow=1", timeout=3600) as response,
    ):
        for raw in response:  # one line per `data:` message; comments keep the stream open
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith("data:"):
                sys.stdout.write(line[5:].removeprefix(" ") + "\n")
                sys.stdout.flush()
