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
    import sys  # speed

    try:
        if argv is None and sys.argv[1:2] == ["serve"]:
            # before typer, rich and asyncio load: see procman.process._early
            from procman.process import _early  # speed

            _early.start(sys.argv[2:])
        from procman.cli._main import run  # speed
    except KeyboardInterrupt:  # Ctrl-C while the CLI is still loading (an early server dies
        return 130  # with us: PDEATHSIG, or _early's exit hook)
    return run(argv)
