"""What a reload did, model by model: printed by ``serve``, returned by ``POST /admin/reload``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from procman.reload.diff import Action, Change

__all__ = ["ModelOutcome", "ReloadReport"]

_COUNTED = (
    (Action.RESTART, "restarted"),
    (Action.IN_PLACE, "changed in place"),
    (Action.ADDED, "added"),
    (Action.REMOVED, "removed"),
    (Action.UNCHANGED, "unchanged"),
)


@dataclass(frozen=True, kw_only=True)
class ModelOutcome:
    """One model after the reload: what was decided, what happened, its process before and after."""

    name: str
    action: Action
    changes: tuple[Change, ...] = ()
    detail: str
    """What was done, in words (``restarted: pid 41 -> 57``, ``stopped after 1 request``)."""
    pid_before: int | None = None
    pid_after: int | None = None
    ok: bool = True
    """False if a restart's start failed (the model is then stopped, or failed)."""

    def line(self) -> str:
        changed = ", ".join(str(c) for c in self.changes)
        return f"{self.name}: {changed + ': ' if changed else ''}{self.detail}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "action": str(self.action),
            "changes": [
                {"key": c.key, "old": _plain(c.old), "new": _plain(c.new), "text": str(c)}
                for c in self.changes
            ],
            "detail": self.detail,
            "pid_before": self.pid_before,
            "pid_after": self.pid_after,
            "ok": self.ok,
        }


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True, kw_only=True)
class ReloadReport:
    """A reload applied: ``[server]`` changes and every model's outcome."""

    file: str
    models: tuple[ModelOutcome, ...] = ()
    server: tuple[str, ...] = ()
    """``[server]`` changes as applied (``max_loaded 2 -> 3``), secrets not shown."""
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [
            f"{n} {word}"
            for action, word in _COUNTED
            if (n := sum(1 for m in self.models if m.action is action))
        ]
        failed = sum(1 for m in self.models if not m.ok)
        if failed:
            parts.append(f"{failed} failed to start")
        if self.server:
            parts.append(f"[server]: {', '.join(self.server)}")
        return f"reloaded {self.file} in {self.seconds:.1f} s: {'; '.join(parts) or 'nothing'}"

    def lines(self) -> list[str]:
        return [self.summary(), *(f"  {m.line()}" for m in self.models)]

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "summary": self.summary(),
            "seconds": round(self.seconds, 3),
            "server": list(self.server),
            "models": [m.to_json() for m in self.models],
            "ok": all(m.ok for m in self.models),
        }
