"""Entry point: import the commands, run typer, map errors to exit codes."""

from __future__ import annotations

import logging
import os
import sys

from rich.markup import escape

from buildtools.errors import BuildError, LlamactlError, VerificationError
from procman.cli._app import app, console
from procman.cli._commands import register
from procman.errors import ServerError

#: exit statuses; documented in the README
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # typer/click usage errors
EXIT_INTERRUPTED = 130


def _report(exc: LlamactlError) -> None:
    from procman.cli._logfmt import OUTPUT  # speed: only on an error

    if OUTPUT.json:  # `serve --log-format json`: its last line is a record too
        tail = getattr(exc, "log_tail", "") or None
        OUTPUT.say("error", escape(exc.message), level="error", hint=exc.hint, log_tail=tail)
        return
    console.print(f"[bold red]error:[/] {exc.message}")
    if isinstance(exc, BuildError):
        if exc.command:
            console.print(f"[dim]command:[/] {' '.join(exc.command)}")
        if exc.returncode is not None:
            console.print(f"[dim]exit status:[/] {exc.returncode}")
        if exc.log_tail:
            console.print("[dim]last lines of the log:[/]")
            console.print(exc.log_tail, markup=False)
        if exc.log_path:
            console.print(f"[dim]full log:[/] {exc.log_path}")
    if isinstance(exc, VerificationError | ServerError) and exc.log_tail:
        console.print("[dim]last lines of the server log:[/]")
        console.print(exc.log_tail, markup=False)
    if exc.hint:
        console.print(f"[yellow]hint:[/] {exc.hint}")


def run(argv: list[str] | None = None) -> int:
    try:
        level = os.environ.get("LLAMACTL_LOG", "WARNING").upper()
        logging.basicConfig(
            level=getattr(logging, level, logging.WARNING), format="%(name)s: %(message)s"
        )
        register(sys.argv[1:] if argv is None else argv)
        # standalone mode: typer reports usage errors itself (exit 2) and
        # always ends in SystemExit; our own errors propagate to us untouched.
        app(args=argv, prog_name="llamactl")
    except SystemExit as exc:
        # click turns Ctrl-C into Abort (raised from the KeyboardInterrupt) and
        # exits 1; keep the conventional 130 without importing click's internals
        aborted = exc.__context__
        if aborted is not None and isinstance(aborted.__cause__, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_ERROR)
    except LlamactlError as exc:
        _report(exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return EXIT_INTERRUPTED
    return EXIT_OK
