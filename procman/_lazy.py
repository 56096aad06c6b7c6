"""Package attributes imported on first use.

A package's ``__init__`` names its public surface without importing it, so
that ``import procman`` (and the early start, which imports
``procman.process._sockets`` before anything else) stays cheap::

    __getattr__, __dir__ = exports(__name__, {"ManagedServer": "procman.process.server"})

(Type checkers see the same names through an ``if TYPE_CHECKING:`` import
block beside it.)
"""

from __future__ import annotations

import importlib
import sys

TYPE_CHECKING = False  # typing costs ~8 ms to import; mypy reads this as typing's
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["exports"]


def exports(
    package: str, names: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``names`` maps each public name to
    the module that defines it (``"Name": "module"``, or ``"Name": "module:attribute"``)."""

    def __getattr__(name: str) -> Any:
        where = names.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attribute = where.partition(":")
        value = getattr(importlib.import_module(module), attribute or name)
        setattr(sys.modules[package], name, value)  # the next lookup is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
