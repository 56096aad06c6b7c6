"""The ``llamactl`` command line.

``main`` is the only place that turns errors into exit codes and messages;
command modules raise :class:`~buildtools.errors.LlamactlError` subclasses.
typer and rich are imported here and in the command modules only, never by
the library packages.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns (and, as a console script, exits with) the status."""
    from procman.cli._main import run

    return run(argv)
