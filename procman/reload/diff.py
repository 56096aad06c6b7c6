"""What a config reload changes, decided before anything is touched.

Each model of the new file is compared with the one running, field by
field. A field that reaches llama-server's command line (or the file it
loads) needs a restart; one that the router or the supervisor enforces is
applied to the running model; a model only in the new file is added, one
only in the old file removed. In ``[server]``, the listener (``host``,
``port``) cannot change without a new socket, so a reload that changes it is
refused whole; the access rules, ``max_loaded`` and the budgets apply in place.

Every field of :class:`~procman.config.ModelSection` and
:class:`~procman.config.ServerSection` is in exactly one of the sets below
(``tests/unit/test_reload_diff.py`` keeps it so), so a field added later
cannot be silently ignored by a reload.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from procman._units import format_bytes, format_duration

if TYPE_CHECKING:
    from procman.config import Config, ModelSection, ServerSection

__all__ = [
    "ACCESS_FIELDS",
    "IN_PLACE_FIELDS",
    "LIMIT_FIELDS",
    "LISTENER_FIELDS",
    "LOOKUP_FIELDS",
    "RESTART_FIELDS",
    "Action",
    "Change",
    "ConfigDiff",
    "ModelDiff",
    "diff_configs",
]

#: model fields that reach llama-server's command line or the file it loads
RESTART_FIELDS = frozenset(
    {
        "path",
        "ctx",
        "parallel",
        "gpu_layers",
        "devices",
        "threads",
        "args",
        "rpc",
        "tensor_split",
        "stall_timeout",
    }
)
#: model fields the router and the supervisor apply to a running model
IN_PLACE_FIELDS = frozenset({"ttl", "queue", "order", "aliases", "memory_limit", "startup_timeout"})
#: server fields that would need a new listening socket: a reload refuses them
LISTENER_FIELDS = frozenset({"host", "port"})
#: server fields the router's access rules take in place
ACCESS_FIELDS = frozenset({"api_key", "api_key_file", "allowed_hosts", "cors_origins"})
#: server fields the supervisor takes in place
LIMIT_FIELDS = frozenset({"max_loaded", "memory_budget", "vram_budget"})
#: server fields that only say where model names are looked up: models resolved from now
#: on (added or restarted) follow them; running ones keep the file they have
LOOKUP_FIELDS = frozenset({"model_dirs"})

_DURATIONS = frozenset({"ttl", "startup_timeout"})
_SIZES = frozenset({"memory_limit", "memory_budget", "vram_budget"})
_SECRET = frozenset({"api_key"})


class Action(StrEnum):
    """What a reload does to one model."""

    UNCHANGED = "unchanged"
    IN_PLACE = "in place"
    RESTART = "restart"
    ADDED = "added"
    REMOVED = "removed"


def _show(key: str, value: Any) -> str:
    if value is None:
        return "unset"
    if key in _SECRET:
        return "(a key)"
    if key in _DURATIONS and isinstance(value, int | float):
        return format_duration(value)
    if key in _SIZES and isinstance(value, int):
        return format_bytes(value)
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return str(value)


@dataclass(frozen=True, kw_only=True)
class Change:
    """One field's old and new value."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key} {_show(self.key, self.old)} -> {_show(self.key, self.new)}"


@dataclass(frozen=True, kw_only=True)
class ModelDiff:
    """One model's fate in a reload, and the changes that decided it."""

    name: str
    action: Action
    changes: tuple[Change, ...] = ()

    @property
    def restart_changes(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.key in RESTART_FIELDS)


@dataclass(frozen=True, kw_only=True)
class ConfigDiff:
    """Every model's :class:`ModelDiff` (old order, then the added) and ``[server]``'s changes."""

    models: tuple[ModelDiff, ...]
    server: tuple[Change, ...]

    @property
    def listener(self) -> tuple[Change, ...]:
        """Changes a running router cannot take (a reload with any is refused)."""
        return tuple(c for c in self.server if c.key in LISTENER_FIELDS)

    def of(self, action: Action) -> tuple[ModelDiff, ...]:
        return tuple(m for m in self.models if m.action is action)


def _changes(old: ModelSection | ServerSection, new: ModelSection | ServerSection) -> list[Change]:
    return [
        Change(key=f.name, old=getattr(old, f.name), new=getattr(new, f.name))
        for f in fields(old)
        if getattr(old, f.name) != getattr(new, f.name)
    ]


def _endpoints(config: Config, model: ModelSection) -> tuple[str, ...]:
    """The RPC worker endpoints a model's ``rpc`` names resolve to in ``config``."""
    return tuple(config.workers[w].endpoint for w in model.rpc if w in config.workers)


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    """What turns ``old`` (running) into ``new``; pure, nothing is resolved or touched."""
    models = []
    for name, section in old.models.items():
        if name not in new.models:
            models.append(ModelDiff(name=name, action=Action.REMOVED))
            continue
        changes = tuple(_changes(section, new.models[name]))
        workers = _endpoints(old, section), _endpoints(new, new.models[name])
        if workers[0] != workers[1] and not any(c.key == "rpc" for c in changes):
            # the same worker names, but a [workers.NAME] table now points elsewhere
            changes += (Change(key="rpc", old=workers[0], new=workers[1]),)
        if not changes:
            action = Action.UNCHANGED
        elif any(c.key in RESTART_FIELDS for c in changes):
            action = Action.RESTART
        else:
            action = Action.IN_PLACE
        models.append(ModelDiff(name=name, action=action, changes=changes))
    models += [
        ModelDiff(name=name, action=Action.ADDED) for name in new.models if name not in old.models
    ]
    return ConfigDiff(models=tuple(models), server=tuple(_changes(old.server, new.server)))
