"""Reloading a running config: what changed, what needs a restart, what was done.

* :mod:`~procman.reload.diff`: two configs in, each model's fate out
  (unchanged, in place, restart, added, removed), pure;
* :mod:`~procman.reload.apply`: :class:`Reloader` applies it to a running
  supervisor, scheduler and router, draining what it stops;
* :mod:`~procman.reload.report`: :class:`ReloadReport`, what a reload did;
* ``_read`` (a config file read with the line of each error) and ``_watch``
  (``serve --watch``): internals.
"""

from __future__ import annotations

from procman._lazy import exports

TYPE_CHECKING = False
if TYPE_CHECKING:
    from procman.reload.apply import Loaded, Reloader
    from procman.reload.diff import Action, Change, ConfigDiff, ModelDiff, diff_configs
    from procman.reload.report import ModelOutcome, ReloadReport

__all__ = [
    "Action", "Change", "ConfigDiff", "Loaded", "ModelDiff", "ModelOutcome", "ReloadReport",
    "Reloader", "diff_configs",
]  # fmt: skip

__getattr__, __dir__ = exports(
    __name__,
    {
        **dict.fromkeys(("Loaded", "Reloader"), "procman.reload.apply"),
        **dict.fromkeys(
            ("Action", "Change", "ConfigDiff", "ModelDiff", "diff_configs"), "procman.reload.diff"
        ),
        **dict.fromkeys(("ModelOutcome", "ReloadReport"), "procman.reload.report"),
    },
)
