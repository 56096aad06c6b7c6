"""Which module registers which command; only the one a run invokes is imported.

Importing every command module costs ~25 ms (urllib, rich tables, the bench
and build layers) that ``llamactl serve`` would pay on its way to its first
answer. ``llamactl --help`` and anything unrecognised import them all.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

__all__ = ["COMMANDS", "register"]

#: command name -> the module under procman.cli that defines it
COMMANDS = {
    "bench": "_bench",
    "build": "_build",
    "builds": "_build",
    "config": "_config",
    "daemon": "_daemon",
    "deploy": "_deploy",
    "detect": "_detect",
    "estimate": "_estimate",
    "load": "_ctl",
    "logs": "_logs",
    "models": "_models",
    "ps": "_ctl",
    "pull": "_models",
    "reload": "_ctl",
    "serve": "_serve",
    "stop": "_ctl",
    "worker": "_worker",
    "workers": "_worker",
}


def register(args: Sequence[str]) -> None:
    """Import the module of the command ``args`` invoke, or every module."""
    wanted = [COMMANDS[args[0]]] if args and args[0] in COMMANDS else sorted(set(COMMANDS.values()))
    for module in wanted:
        importlib.import_module(f"procman.cli.{module}")
