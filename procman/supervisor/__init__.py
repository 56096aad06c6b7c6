"""The supervisor: every managed server by name, one event stream for all of them.

Servers are registered by name and alias, looked up by the ``model`` a
request names, and all publish into one :class:`~procman.events.EventBus`.

Servers added with ``on_demand=True`` (what ``serve --config`` does) start
when the first request for them arrives and stop after ``ttl`` seconds
without one. ``max_loaded`` bounds how many run at once: loading one more
first stops the least recently used server that no request is using. "In
use" is counted by :meth:`Supervisor.using`, which the router holds for a
request's whole life, waiting in its queue included, so that an idle timer
never stops a model that has requests waiting for it.

Memory (see :mod:`procman.memory._limits`): before each start the model's needs
are estimated and reserved against ``memory_budget``/``vram_budget``; a
server that does not fit evicts the least recently used idle ones, or is
refused with :class:`~procman.memory.budget.OverBudget` (an ``AdmissionError``).
A sampling task reads every server's memory every ``sample_interval``
seconds; a server over its ``memory_limit`` for long enough is restarted
(through its restart policy, so repeated breaches end in ``failed``) or
stopped, as ``limit_settings.action`` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any

from procman.errors import AdmissionError, ConfigError
from procman.events import Event, EventBus, State
from procman.memory.budget import MachineMemory, Size
from procman.memory.enforce import LimitAction, LimitDecision, LimitSettings
from procman.process.cpu import share_cores, usable_cores
from procman.process.policy import RestartPolicy
from procman.process.server import ManagedServer
from procman.router.metrics import Snapshot
from procman.spec import ServerSpec
from procman.supervisor._entry import Entry, Fetch

if TYPE_CHECKING:
    from procman.memory._limits import Limits
    from procman.memory.budget import Reservation
    from procman.models.pull import PullProgress

__all__ = ["AsyncSupervisor", "Fetch"]


class AsyncSupervisor:
    """Owns :class:`ManagedServer` objects; leaving ``async with Supervisor()`` stops them all."""

    def __init__(
        self,
        *,
        bus: EventBus | None = None,
        max_loaded: int | None = None,
        memory_budget: Size = "auto",
        vram_budget: Size = "auto",
        sample_interval: float = 5.0,
        limit_settings: LimitSettings | None = None,
        machine: MachineMemory | None = None,
    ) -> None:
        """``memory_budget``/``vram_budget``: bytes, ``"auto"``, or None (no limit);
        ``limit_settings``: how a per-model ``memory_limit`` is enforced (its own
        ``memory_limit`` is ignored); ``machine``: a memory probe, for tests."""
        if max_loaded is not None and max_loaded < 1:
            raise ConfigError(f"max_loaded must be at least 1, got {max_loaded}")
        if sample_interval <= 0:
            raise ConfigError(f"sample_interval must be positive, got {sample_interval}")
        self.bus = bus or EventBus()
        self.max_loaded = max_loaded
        self.sample_interval = sample_interval
        self._budget_settings = (memory_budget, vram_budget, machine)
        self._limit_settings = limit_settings or LimitSettings()
        self._limits: Limits | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.bus.subscribe(self._on_event)
        self._servers: dict[str, ManagedServer] = {}
        self._entries: dict[str, Entry] = {}
        self._room = asyncio.Lock()  # one load at a time decides who makes room
        self._idle = asyncio.Event()  # set (and replaced) whenever a server becomes idle
        self._tasks: set[asyncio.Task[None]] = set()
        self._usable_cores: int | None = None

    @property
    def servers(self) -> Mapping[str, ManagedServer]:
        return MappingProxyType(self._servers)

    def upstreams(self) -> Sequence[ManagedServer]:
        return list(self._servers.values())

    def add(
        self,
        spec: ServerSpec,
        *,
        policy: RestartPolicy | None = None,
        validate: bool = True,
        ttl: float | None = None,
        on_demand: bool = False,
        memory_limit: int | None = None,
        fetch: Fetch | None = None,
    ) -> ManagedServer:
        """Register a server (not started); its name and aliases must be unique.

        ``on_demand``: requests start it when it is stopped (or failed);
        ``ttl``: seconds without requests after which it is stopped;
        ``memory_limit``: bytes of RSS it may hold (see ``limit_settings``);
        ``fetch``: downloads ``spec.model`` at the first load (progress in events and
        ``status()``), which then runs the file it returns.
        """
        taken = {
            name for server in self._servers.values() for name in (server.name, *server.aliases)
        }
        if clash := sorted({spec.name, *spec.aliases} & taken):
            raise ConfigError(f"model name already served: {', '.join(clash)}")
        server = ManagedServer(spec, bus=self.bus, policy=policy, validate=validate)
        self._servers[spec.name] = server
        self._entries[spec.name] = Entry(server, ttl, on_demand, spec, memory_limit, fetch=fetch)
        return server

    async def serve(self, spec: ServerSpec) -> ManagedServer:
        """Register and start a server; returns once it is ready (raises as ``start`` does)."""
        server = self.add(spec)
        await self.load(spec.name)
        return server

    def find(self, model: str | None) -> ManagedServer | None:
        """The server a request's ``model`` names.

        With a single server any name (or none) reaches it, as clients often
        send a fixed name such as ``gpt-4o-mini``. With several, the name or an
        alias must match; an absent name is ambiguous.
        """
        if len(self._servers) == 1:
            return next(iter(self._servers.values()))
        if model is None:
            return None
        for server in self._servers.values():
            if model == server.name or model in server.aliases:
                return server
        return None

    def on_demand(self, name: str) -> bool:
        """Whether requests start this server (so being stopped is not a fault)."""
        entry = self._entries.get(name)
        return entry is not None and entry.on_demand

    # -- loading and unloading -------------------------------------------------------------
    def _entry(self, name: str) -> Entry:
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(self._entries) or "none"
            raise ConfigError(f"no model named {name!r}", hint=f"configured: {known}")
        return entry

    async def load(self, name: str) -> ManagedServer:
        """Start ``name`` unless it runs already; returns once it is ready.

        Makes room under ``max_loaded`` first, waiting for a server to become
        idle if all are busy, then within the memory budget (evicting idle
        servers, or raising :class:`~procman.memory.budget.OverBudget`). Raises as
        :meth:`ManagedServer.start` does.
        """
        entry = self._entry(name)
        async with entry.lock:
            if entry.loaded:
                return entry.server
            if entry.fetch is not None:
                await self._fetch(entry)
            async with self._room:
                await self._make_room(entry)
                held: list[Reservation] = []

                async def admit() -> None:
                    held.append(await self._admit(entry))

                try:
                    await entry.server.start(before_spawn=admit)
                except BaseException:
                    for reservation in held:
                        reservation.release()
                    raise
                self._start_sampler()
        if entry.users == 0:
            self._arm(entry)
        return entry.server

    async def _fetch(self, entry: Entry) -> None:
        """Download the model (in a thread); progress goes to the events and ``status()``."""
        from procman._units import format_bytes  # speed

        fetch = entry.fetch
        if fetch is None:
            return
        loop, name, shown = asyncio.get_running_loop(), entry.spec.name, [-1]
        ref = str(entry.spec.model)

        def report(progress: PullProgress) -> None:  # called in the download thread
            pct = 100 * progress.done // progress.total if progress.total else 0
            part = f" (part {progress.part}/{progress.parts})" if progress.parts > 1 else ""
            text = (
                f"pulling {progress.ref}{part}: {progress.stage} {pct}% "
                f"of {format_bytes(progress.total)}"
            )
            loud = pct // 10 != shown[0] or progress.stage != "downloading"
            shown[0] = pct // 10
            loop.call_soon_threadsafe(self._pull_progress, entry, text, loud)

        self._pull_progress(entry, f"pulling {ref}", True)
        try:
            path = await asyncio.to_thread(fetch, report)
        except Exception as exc:
            state = entry.server.state
            self.bus.emit(name, state, state, f"pull failed: {exc}")
            entry.server.note(f"pull failed: {exc}")
            raise
        finally:
            entry.pulling = None
        entry.fetch = None
        entry.spec = replace(entry.spec, model=path)
        entry.server.spec = replace(entry.server.spec, model=path)
        state = entry.server.state
        self.bus.emit(name, state, state, f"pulled {ref}: {path}")
        entry.server.note(f"pulled {ref}: {path}")

    def _pull_progress(self, entry: Entry, text: str, loud: bool) -> None:
        entry.pulling = text
        if loud:  # every 10 % and each stage: the events, serve's output and the log stay readable
            state = entry.server.state
            self.bus.emit(entry.spec.name, state, state, text)
            entry.server.note(text)

    async def _admit(self, entry: Entry) -> Reservation:
        """Choose ``-ngl``, estimate, reserve, and stop whatever must be evicted for it."""
        limits, name = self.limits, entry.spec.name
        prepared = await asyncio.to_thread(limits.prepare, entry.spec, entry.memory_limit)
        share = share_cores(prepared.spec, servers=self._may_run_at_once(), cores=self._cores())
        entry.server.spec, entry.need = share.spec, prepared.need
        try:
            reservation = limits.reserve(name, prepared.need)
        except AdmissionError as exc:
            self._note(name, "refused", exc.message)
            raise
        reasons = (
            prepared.devices_reason,
            prepared.layers_reason,
            share.reason,
            reservation.decision.reason,
        )
        self._note(name, "admitted", "; ".join(r for r in reasons if r))
        with reservation:
            for victim in reservation.evict:
                why = f"evicted for {name!r}: {reservation.decision.reason}"
                self._note(victim, "evicted", why)
                await self._stop_entry(self._entries[victim], why)
                limits.release(victim)
        entry.last_used = time.monotonic()
        return reservation

    def _may_run_at_once(self) -> int:
        """Servers that may compute at the same time: every model held, up to ``max_loaded``."""
        held = len(self._entries)
        return held if self.max_loaded is None else min(held, self.max_loaded)

    def _cores(self) -> int:
        if self._usable_cores is None:
            self._usable_cores = usable_cores()
        return self._usable_cores

    async def unload(self, name: str, reason: str = "unloaded on request") -> None:
        """Stop ``name`` (it stays configured; an on-demand model starts again when asked for)."""
        entry = self._entry(name)
        async with entry.lock:
            self._disarm(entry)
            await entry.server.stop(reason)

    async def _make_room(self, entry: Entry) -> None:
        while self.max_loaded is not None:
            loaded = [e for e in self._entries.values() if e is not entry and e.loaded]
            if len(loaded) < self.max_loaded:
                return
            idle = [e for e in loaded if e.users == 0]
            if not idle:
                await self._idle.wait()  # every loaded model is serving: wait for one to finish
                continue
            victim = min(idle, key=lambda e: e.last_used)
            reason = f"making room for {entry.server.name!r} (max_loaded={self.max_loaded})"
            self._note(victim.spec.name, "evicted", reason)
            await self._stop_entry(victim, reason)

    def _note(self, name: str, kind: str, reason: str) -> None:
        """An event that changes no state (see ``procman.events.EVENT_KINDS``)."""
        state = self._entries[name].server.state
        self.bus.emit(name, state, state, reason, kind=kind)

    async def _stop_entry(self, entry: Entry, reason: str) -> None:
        async with entry.lock:
            self._disarm(entry)
            await entry.server.stop(reason)

    @contextlib.asynccontextmanager
    async def using(self, name: str) -> AsyncIterator[None]:
        """Mark ``name`` busy for the block: no idle timer or eviction stops it meanwhile."""
        entry = self._entry(name)
        entry.users += 1
        entry.requests += 1
        self._disarm(entry)
        try:
            yield
        finally:
            entry.users -= 1
            entry.last_used = time.monotonic()
            if entry.users == 0:
                self._arm(entry)
                self._idle.set()
                self._idle = asyncio.Event()

    def _arm(self, entry: Entry) -> None:
        self._disarm(entry)
        if entry.ttl is not None and entry.loaded:
            loop = asyncio.get_running_loop()
            entry.timer = loop.call_later(entry.ttl, self._expire, entry)

    def _disarm(self, entry: Entry) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None

    def _expire(self, entry: Entry) -> None:
        entry.timer = None
        if entry.users or not entry.loaded:
            return
        reason = f"idle for {entry.ttl:g} s (ttl)"
        task = asyncio.create_task(self._expire_now(entry, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _expire_now(self, entry: Entry, reason: str) -> None:
        async with entry.lock:
            if entry.users == 0 and entry.timer is None:  # nobody came meanwhile
                await entry.server.stop(reason)

    # -- memory: budget, sampling, limits ----------------------------------------------------
    @property
    def limits(self) -> Limits:
        """The budget, ledger and meter; built at first use (probes memory, opens NVML)."""
        if self._limits is None:
            from procman.memory._limits import Limits  # speed

            memory, vram, machine = self._budget_settings
            self._limits = Limits(
                memory_budget=memory,
                vram_budget=vram,
                activity=self._activity,
                settings=self._limit_settings,
                machine=machine,
            )
        return self._limits

    def last_request(self) -> tuple[float, bool]:
        """(monotonic time the latest request to any server ended, whether one is in flight);
        0.0 before any."""
        entries = list(self._entries.values())
        ended = max((e.last_used for e in entries if e.requests), default=0.0)
        return ended, any(e.users for e in entries)

    def _activity(self, name: str) -> tuple[float, bool]:
        entry = self._entries.get(name)
        if entry is None:
            return 0.0, False
        starting = {State.STARTING, State.LOADING, State.RESTARTING, State.WAITING_WORKERS}
        return entry.last_used, entry.users > 0 or entry.server.state in starting

    def _on_event(self, event: Event) -> None:
        entry = self._entries.get(event.server)
        if entry is not None:
            if event.kind == "refused":
                entry.refused = event.reason
            elif event.kind == "admitted":
                entry.refused = ""
            if not event.is_note:
                entry.state_since = event.time
            if event.state in {State.RESTARTING, State.FAILED}:
                entry.last_exit = event.reason
        if entry is None or self._limits is None or event.is_note:
            return
        if event.state is State.STARTING and event.pid is not None:
            self._limits.on_spawn(event.server, event.pid, entry.memory_limit)
        elif event.state in {State.RESTARTING, State.STOPPED, State.FAILED}:
            self._limits.on_reaped(event.server)
        if event.state.is_final:
            self._limits.release(event.server)

    def set_budget(self, memory_budget: Size, vram_budget: Size) -> None:
        """New budgets (a config reload): later admissions are decided against them."""
        self._budget_settings = (memory_budget, vram_budget, self._budget_settings[2])
        if self._limits is not None:
            self._limits.set_budget(memory_budget, vram_budget)

    def set_memory_limit(self, name: str, memory_limit: int | None) -> None:
        """Change ``name``'s limit; enforced from the next sample, checked at the next load."""
        entry = self._entry(name)
        entry.memory_limit = memory_limit
        self.limits.set_limit(name, memory_limit)

    def _start_sampler(self) -> None:
        if self._sampler is None or self._sampler.done():
            self._stopping.clear()
            self._sampler = asyncio.create_task(self._sample_loop(), name="llamactl-sampler")

    async def _sample_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.sample_interval)
            if self._stopping.is_set():
                return
            await self.sample_now()

    async def sample_now(self) -> None:
        """One sampling round: memory of every running server, limits enforced."""
        running = {
            name: e.server.pid for name, e in self._entries.items() if e.server.pid is not None
        }
        # read in a worker thread: PSS (every 30 s) makes the kernel walk each server's
        # page tables, ~10 ms for the demo model, which would stall every request meanwhile
        by_pid = await asyncio.to_thread(self.limits.meter.sample, running.values())
        decisions = self.limits.sample(running, by_pid)
        for name, decision in decisions.items():
            self._enforce(self._entries[name], decision)
        await self.limits.scrape(e.server for e in self._entries.values())

    def _enforce(self, entry: Entry, decision: LimitDecision) -> None:
        if decision.action is LimitAction.RESTART:
            entry.server.recycle(decision.reason)
            return
        task = asyncio.create_task(self._stop_entry(entry, decision.reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """Per server: what ``llamactl ps`` shows (state, pid, private socket, RSS, restarts...).

        ``rss_bytes`` is read now; ``cpu_percent``, ``vram_bytes`` and
        ``tokens_per_second`` come from the last sample (None until there is one).
        """
        now = time.monotonic()
        rows = []
        samples = self._limits.samples if self._limits is not None else {}
        speeds = self._limits.tokens_per_second if self._limits is not None else {}
        for name, entry in self._entries.items():
            spec = entry.server.spec
            devices = (
                self._limits.devices_status(name, spec.visible_devices)
                if self._limits is not None
                else []
            )
            rows.append(entry.row(now, samples.get(name), speeds.get(name), devices))
        return rows

    def metrics_snapshot(self, queue_depth: Mapping[str, int] | None = None) -> Snapshot:
        """The figures ``GET /metrics`` exports (see :mod:`procman.router.metrics`)."""
        servers = [(e.server, e.requests) for e in self._entries.values()]
        return self.limits.snapshot(servers, queue_depth or {})

    def memory(self) -> dict[str, Any]:
        """The budgets, the machine's memory when they were set, and what each server holds
        against them (its estimate, or more once measured): ``GET /admin/memory``."""
        limits = self.limits
        budget, machine, stats = limits.budget, limits.machine, limits.ledger.stats
        held = limits.ledger.held()
        return {
            "budget": dataclasses.asdict(budget),
            "machine": dataclasses.asdict(machine),
            "held": {name: {"bytes": h, "vram_bytes": d} for name, (h, d) in held.items()},
            "admissions": stats.admissions,
            "evictions": stats.evictions,
            "refusals": stats.refusals,
        }

    def hide(self, name: str) -> None:
        """Requests no longer find ``name``; those that did finish (a reload removes it)."""
        self._servers.pop(name, None)

    def retune(self, name: str, spec: ServerSpec, ttl: float | None, limit: int | None) -> None:
        """Take ``spec`` (a reload): whole if the server is stopped, else only what needs no
        restart (aliases, startup timeout); ``ttl`` runs again from now."""
        entry = self._entry(name)
        entry.spec = spec
        server = entry.server
        if server.state.is_final:
            server.spec = spec
        else:  # the running process keeps its -ngl and arguments
            server.spec = dataclasses.replace(
                server.spec, aliases=spec.aliases, startup_timeout=spec.startup_timeout
            )
        entry.ttl = ttl
        if entry.users == 0:
            self._arm(entry)
        if limit != entry.memory_limit:
            self.set_memory_limit(name, limit)

    async def remove(self, name: str, reason: str = "removed") -> None:
        server = self._servers.pop(name, None)
        entry = self._entries.pop(name, None)
        if entry is not None:
            self._disarm(entry)
            server = entry.server  # hidden first, perhaps
        if server is not None:
            await server.stop(reason)
        if self._limits is not None:
            self._limits.release(name)

    async def stop(self) -> None:
        """Stop every server concurrently (each: SIGTERM, grace, SIGKILL)."""
        self._stopping.set()
        for entry in self._entries.values():
            self._disarm(entry)
        for task in list(self._tasks):
            task.cancel()
        sampler, self._sampler = self._sampler, None
        await asyncio.gather(
            *(server.stop("supervisor stopping") for server in self._servers.values()),
            *self._tasks,
            *([sampler] if sampler is not None else []),
            return_exceptions=True,
        )
        if self._limits is not None:
            self._limits.close()
            self._limits = None

    async def __aenter__(self) -> AsyncSupervisor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
