"""Apply a config reload to a running ``serve --config``, model by model.

The new file is read, validated and resolved (model files included) before
anything changes, in a worker thread; any error refuses the reload whole.
Then, against the diff (:mod:`procman.reload.diff`):

* removed models are hidden at once (new requests get 404), their queue is
  closed (requests in line get 404 with the reason), the requests in
  flight finish (up to ``drain_timeout``), and the server stops;
* changed models whose changes need no restart take them in place (ttl,
  queue bound and order, aliases, memory limit, startup timeout);
* added models are registered, to start on their first request like every
  model of a config;
* a model whose change needs a restart has its queue held (requests wait in
  line, none fails), its requests in flight finish, and it is stopped and,
  if it was running, started again with the new settings;
* unchanged models are not touched: same process, same queue.

Reloads run one at a time; each ends in a :class:`~procman.reload.report.ReloadReport`
and one ``reload`` event per model on the supervisor's bus.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from procman.errors import ConfigError, LlamactlError
from procman.events import State
from procman.reload._read import at_line
from procman.reload.diff import (
    ACCESS_FIELDS,
    Action,
    Change,
    ConfigDiff,
    ModelDiff,
    diff_configs,
)
from procman.reload.report import ModelOutcome, ReloadReport
from procman.router.scheduler import QueueSettings

if TYPE_CHECKING:
    from procman.config import Config, ModelPlan, ServePlan, ServerSection
    from procman.router._guard import Guard
    from procman.router.scheduler import Scheduler
    from procman.supervisor import AsyncSupervisor

__all__ = ["Loaded", "Reloader", "queue_settings"]


@dataclass(frozen=True, kw_only=True)
class Loaded:
    """A config file as ``serve`` runs it: validated, and resolved into a plan."""

    config: Config
    plan: ServePlan


def queue_settings(model: ModelPlan) -> QueueSettings:
    """The queue a model of the config gets (its slots are its ``parallel``)."""
    return QueueSettings(slots=model.spec.parallel or 1, maxsize=model.queue, order=model.order)


class Reloader:
    """Reloads of one running config: ``await reloader.reload()``, one at a time."""

    def __init__(
        self,
        *,
        file: Path,
        load: Callable[[], Loaded],
        current: Loaded,
        supervisor: AsyncSupervisor,
        scheduler: Scheduler,
        guard: Guard,
        drain_timeout: float = 120.0,
        on_report: Callable[[ReloadReport], object] | None = None,
        on_refused: Callable[[LlamactlError], object] | None = None,
    ) -> None:
        """``load`` reads and resolves the file (it runs in a worker thread and raises
        :class:`LlamactlError` to refuse); ``drain_timeout``: seconds requests in flight
        get to finish before their model is stopped (removed or restarted)."""
        self.file = file
        self.current = current
        self._load = load
        self._supervisor = supervisor
        self._scheduler = scheduler
        self._guard = guard
        self.drain_timeout = drain_timeout
        self._on_report = on_report
        self._on_refused = on_refused
        self._lock = asyncio.Lock()

    async def reload(self) -> ReloadReport:
        """Read the file again and apply it; raises (changing nothing) if it is refused."""
        async with self._lock:
            started = time.monotonic()
            try:
                diff, new = await asyncio.to_thread(self._prepare)
            except LlamactlError as exc:
                if self._on_refused is not None:
                    self._on_refused(exc)
                raise
            outcomes, server = await self._apply(diff, new)
            self.current = new
            report = ReloadReport(
                file=str(self.file),
                models=outcomes,
                server=server,
                seconds=time.monotonic() - started,
            )
            if self._on_report is not None:
                self._on_report(report)
            return report

    # -- before anything changes -------------------------------------------------------------
    def _prepare(self) -> tuple[ConfigDiff, Loaded]:
        from procman.models.gguf import validate_model  # speed: once per reload

        try:
            new = self._load()
        except LlamactlError as exc:  # `models.x: model not found` from resolving: say where
            raise at_line(exc, self.file) from exc
        diff = diff_configs(self.current.config, new.config)
        if diff.listener:
            changed = ", ".join(str(c) for c in diff.listener)
            raise ConfigError(
                f"{self.file}: [server] {changed} needs a new listener: a reload cannot "
                "change it, and nothing was changed",
                hint="put the old value back, or restart `llamactl serve` to listen there",
            )
        plans = {m.spec.name: m for m in new.plan.models}
        for model in diff.models:
            fresh = model.action is Action.ADDED or any(c.key == "path" for c in model.changes)
            if fresh:
                try:
                    validate_model(plans[model.name].spec.model)
                except LlamactlError as exc:
                    error = ConfigError(f"models.{model.name}: {exc.message}", hint=exc.hint)
                    raise at_line(error, self.file) from exc
        return diff, new

    # -- applying ------------------------------------------------------------------------------
    async def _apply(
        self, diff: ConfigDiff, new: Loaded
    ) -> tuple[tuple[ModelOutcome, ...], tuple[str, ...]]:
        plans = {m.spec.name: m for m in new.plan.models}
        removals = {m.name: self._start_removal(m) for m in diff.of(Action.REMOVED)}
        server = self._apply_server(diff.server, new.config.server)
        outcomes: dict[str, ModelOutcome] = {}
        for model in diff.models:
            match model.action:
                case Action.UNCHANGED:
                    outcomes[model.name] = self._unchanged(model)
                case Action.IN_PLACE:
                    outcomes[model.name] = self._in_place(model, plans[model.name])
                case Action.ADDED:
                    outcomes[model.name] = self._add(model, plans[model.name])
                case Action.RESTART | Action.REMOVED:
                    pass
        for model in diff.of(Action.RESTART):
            outcomes[model.name] = await self._restart(model, plans[model.name])
        for name, removal in removals.items():
            outcomes[name] = await removal
        ordered = tuple(outcomes[m.name] for m in diff.models)
        for outcome in ordered:
            self._announce(outcome)
        return ordered, server

    def _announce(self, outcome: ModelOutcome) -> None:
        server = self._supervisor.servers.get(outcome.name)
        state = server.state if server is not None else State.STOPPED
        self._supervisor.bus.emit(
            outcome.name,
            state,
            state,
            f"reload: {outcome.line().split(': ', 1)[1]}",
            pid=server.pid if server is not None else None,
            kind="reload",
        )

    def _apply_server(self, changes: tuple[Change, ...], section: ServerSection) -> tuple[str, ...]:
        keys = {c.key for c in changes}
        if keys & ACCESS_FIELDS:
            self._guard.configure(
                api_key=section.api_key,
                allowed_hosts=section.allowed_hosts,
                cors_origins=section.cors_origins,
            )
        if "max_loaded" in keys:
            self._supervisor.max_loaded = section.max_loaded
        if keys & {"memory_budget", "vram_budget"}:
            self._supervisor.set_budget(section.memory_budget, section.vram_budget)
        return tuple(str(c) for c in changes)

    def _unchanged(self, model: ModelDiff) -> ModelOutcome:
        pid = self._supervisor.servers[model.name].pid
        detail = f"unchanged, pid {pid} kept" if pid is not None else "unchanged (not running)"
        return ModelOutcome(
            name=model.name, action=model.action, detail=detail, pid_before=pid, pid_after=pid
        )

    def _in_place(self, model: ModelDiff, plan: ModelPlan) -> ModelOutcome:
        self._supervisor.retune(model.name, plan.spec, plan.ttl, plan.memory_limit)
        if (queue := self._scheduler.queue(model.name)) is not None:
            queue.update(queue_settings(plan))
        pid = self._supervisor.servers[model.name].pid
        kept = f", pid {pid} kept" if pid is not None else ""
        return ModelOutcome(
            name=model.name,
            action=model.action,
            changes=model.changes,
            detail=f"applied in place{kept}",
            pid_before=pid,
            pid_after=pid,
        )

    def _add(self, model: ModelDiff, plan: ModelPlan) -> ModelOutcome:
        self._supervisor.add(
            plan.spec,
            validate=False,
            ttl=plan.ttl,
            on_demand=True,
            memory_limit=plan.memory_limit,
        )
        self._scheduler.add(model.name, queue_settings(plan))
        return ModelOutcome(
            name=model.name, action=model.action, detail="added: starts on its first request"
        )

    async def _restart(self, model: ModelDiff, plan: ModelPlan) -> ModelOutcome:
        name = model.name
        server = self._supervisor.servers[name]
        queue = self._scheduler.queue(name)
        before, running = server.pid, not server.state.is_final
        why = f"reload: {', '.join(str(c) for c in model.restart_changes)}"
        if queue is not None:
            queue.hold()  # new requests wait in line for the restarted server
        try:
            finished = queue is None or await queue.drained(self.drain_timeout)
            if running:
                await self._supervisor.unload(name, why)
            self._supervisor.retune(name, plan.spec, plan.ttl, plan.memory_limit)
            if queue is not None:
                queue.update(queue_settings(plan))
            late = f" (requests still running after {self.drain_timeout:g} s: cut)"
            cut = "" if finished else late
            outcome = ModelOutcome(
                name=name, action=model.action, changes=model.changes, detail="", pid_before=before
            )
            if not running:
                return _with(outcome, "not running: the new settings apply at its next start")
            try:
                await self._supervisor.load(name)
            except LlamactlError as exc:
                return _with(outcome, f"restart failed{cut}: {exc.message}", ok=False)
            return _with(outcome, f"restarted{cut}: pid {before} -> {server.pid}", pid=server.pid)
        finally:
            if queue is not None:
                queue.resume()

    def _start_removal(self, model: ModelDiff) -> asyncio.Task[ModelOutcome]:
        """Hide the model now (new requests: 404) and close its queue; drain in a task."""
        name = model.name
        server = self._supervisor.servers[name]
        queue = self._scheduler.queue(name)
        self._supervisor.hide(name)
        in_line = queue.waiting if queue is not None else 0
        if queue is not None:
            queue.close(f"removed from {self.file.name} by a reload")

        async def drain() -> ModelOutcome:
            in_flight = queue.active if queue is not None else 0
            finished = queue is None or await queue.drained(self.drain_timeout)
            pid = server.pid
            await self._supervisor.remove(name, f"removed from {self.file.name} by a reload")
            self._scheduler.remove(name)
            parts = [
                f"{in_flight} request(s) in flight "
                + ("finished" if finished else f"cut after {self.drain_timeout:g} s")
            ]
            if in_line:
                parts.append(f"{in_line} waiting answered 404")
            parts.append(f"stopped pid {pid}" if pid is not None else "was not running")
            return ModelOutcome(
                name=name,
                action=model.action,
                detail=f"removed: {', '.join(parts)}",
                pid_before=pid,
                ok=True,
            )

        return asyncio.create_task(drain(), name=f"llamactl-remove-{name}")


def _with(
    outcome: ModelOutcome, detail: str, *, ok: bool = True, pid: int | None = None
) -> ModelOutcome:
    return replace(outcome, detail=detail, ok=ok, pid_after=pid)
