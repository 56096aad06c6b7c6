"""The typer application; command modules register themselves on ``app``."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="llamactl",
    help="Build llama.cpp's server for this machine and serve GGUF models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: human-readable output (tables, progress) goes to stderr so that --json on
#: stdout stays machine-readable
console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def _show_version(value: bool) -> None:
    if value:
        from procman.cli._version import installed_lines  # speed

        for line in installed_lines():
            out.print(line, markup=False)
        raise typer.Exit


@app.callback()
def _group(
    version: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        callback=_show_version,
        help="the release, and the llama-server build and variant it carries",
    ),
) -> None:
    """Keeps llamactl a command group when a run registers one command (see _commands)."""
