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


@app.callback()
def _group() -> None:
    """Keeps llamactl a command group when a run registers one command (see _commands)."""
