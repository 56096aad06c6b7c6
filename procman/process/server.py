"""One supervised llama-server: spawn, health-check, restart, stop.

:class:`ManagedServer` is an async context manager that owns at most one
child process at a time. Its life is driven by real signals only: the
process exiting (the child watcher tells us at once), llama-server's
``/health`` (503 while loading, 200 when ready; it has no push signal, so it
is polled at a short interval while loading and a long one afterwards), and
the startup timeout. Every change of state is an :class:`~procman.events.Event`.

Process hygiene (own process group, death with the parent, what each OS
gets) lives in :mod:`procman.process._child`.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import time
from datetime import datetime
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from procman.errors import ServerError, StartupTimeout
from procman.events import Event, EventBus, State
from procman.process._child import Child, adopt, describe_exit, spawn, terminate
from procman.process.endpoint import Endpoint, is_bind_failure
from procman.process.logs import LineTail, RotatingLog
from procman.process.policy import Action, RestartPolicy, is_crash
from procman.spec import ServerSpec

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import aiohttp

    from procman.distributed.group import WorkerGroup
    from procman.process._early import EarlyServer

__all__ = ["ManagedServer"]


def _group(spec: ServerSpec) -> WorkerGroup | None:
    if not spec.rpc:
        return None
    from procman.distributed.group import WorkerGroup  # speed

    return WorkerGroup(spec.name, spec.rpc, spec.stall_timeout)


log = logging.getLogger(__name__)

_BIND_ATTEMPTS = 5
_TAIL_LINES = 40


class _End(Enum):
    """Why one life of the process ended: it exited, or we killed it for hanging."""

    EXITED = "exited"
    ENDED = "ended"  # after being ready, not by a crash (see procman.process.policy.is_crash)
    TIMEOUT = "timeout"
    UNHEALTHY = "unhealthy"
    RECYCLED = "recycled"


class ManagedServer:
    """One llama-server under supervision; ``async with ManagedServer(spec) as s:``."""

    def __init__(
        self,
        spec: ServerSpec,
        *,
        bus: EventBus | None = None,
        policy: RestartPolicy | None = None,
        validate: bool = True,
    ) -> None:
        self.spec = spec
        self.bus = bus or EventBus()
        self.policy = policy or RestartPolicy(spec.restart)
        self._validate = validate
        self._state = State.STOPPED
        self._pid: int | None = None
        self._endpoint: Endpoint | None = None
        self._available = asyncio.Event()
        self._settled = asyncio.Event()
        self._settled.set()
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._ever_ready = False
        self._log = RotatingLog(
            spec.log_path, max_bytes=spec.log.max_bytes, backups=spec.log.backups
        )
        self._tail = LineTail(_TAIL_LINES)
        self._recycle: asyncio.Future[str] | None = None
        self._offered: EarlyServer | None = None
        self.restarts = 0
        #: the RPC workers that hold part of the model (see procman.distributed.group)
        self._group = _group(spec)
        self.last_reason = "not started"
        self.ready_since: float | None = None
        self.failed_until = 0.0
        """After too many crashes: time.monotonic() before which no start is tried."""

    # -- what others read -------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def aliases(self) -> tuple[str, ...]:
        return self.spec.aliases

    @property
    def state(self) -> State:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def endpoint(self) -> Endpoint | None:
        """Where the private server listens while a process is running (see
        :mod:`procman.process.endpoint`)."""
        return self._endpoint

    @property
    def port(self) -> int | None:
        """The private TCP port (None on a Unix socket, or when not running)."""
        return self._endpoint.port if self._endpoint is not None else None

    @property
    def api_key(self) -> str | None:
        """The key a client of the private TCP server sends (None on a Unix socket)."""
        return self._endpoint.api_key if self._endpoint is not None else None

    @property
    def pipeline(self) -> int:
        return self.spec.pipeline

    @property
    def url(self) -> str | None:
        """Base URL of the private TCP server while a process is running (None on a
        socket: use :attr:`endpoint`)."""
        endpoint = self._endpoint
        return endpoint.url if endpoint is not None and endpoint.socket is None else None

    @property
    def log_path(self) -> Path:
        return self.spec.log_path

    def log_tail(self) -> str:
        return self._tail.text()

    def workers_status(self) -> list[dict[str, Any]]:
        """The RPC workers' state (see :meth:`WorkerGroup.status`); empty without workers."""
        if self._group is None:
            return []
        return self._group.status(serving=self._state in {State.READY, State.UNHEALTHY})

    def retry_in(self, now: float | None = None) -> float:
        """Seconds until a server failed by its crashes may be started again (0: now)."""
        if self._state is not State.FAILED:
            return 0.0
        return max(0.0, self.failed_until - (time.monotonic() if now is None else now))

    async def wait_ready(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 - callers want a bool, not an exception
    ) -> bool:
        """Wait until requests can be forwarded (ready, or unhealthy but up).

        Returns False on timeout, or at once if the server is stopped or failed.
        """
        if self._available.is_set():
            return True
        if self._settled.is_set():  # stopped or failed, and not being started
            return False
        waiters = {
            asyncio.ensure_future(self._available.wait()),
            asyncio.ensure_future(self._settled.wait()),
        }
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return self._available.is_set()

    # -- lifecycle -----------------------------------------------------------
    async def __aenter__(self) -> ManagedServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self, before_spawn: Callable[[], Awaitable[None]] | None = None) -> None:
        """Validate the model, spawn the server and return once it is ready.

        ``before_spawn`` runs once the start has begun (concurrent callers
        already wait for it) and before the process exists. Raises
        :class:`~procman.errors.ModelError` before anything is spawned,
        :class:`ServerError`/:class:`StartupTimeout` (with the log tail) if
        the first start fails. If this call is cancelled half way,
        the child is killed and reaped before the cancellation propagates.
        """
        if not self._settled.is_set():
            raise ServerError(f"server {self.name!r} is already running")
        self._settled.clear()  # from here on, requests wait for this start
        try:
            if self._validate:
                from procman.models.gguf import validate_model  # speed

                await asyncio.to_thread(validate_model, self.spec.model)
            if before_spawn is not None:  # the supervisor's admission; it may replace the spec
                await before_spawn()
        except BaseException:
            self._settled.set()
            raise
        self._first = asyncio.get_running_loop().create_future()
        self._ever_ready = False
        self.policy.reset()
        self._task = asyncio.create_task(self._supervise(self._first), name=f"llamactl-{self.name}")
        try:
            await asyncio.shield(self._first)
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            await self.stop("start cancelled" if cancelled else "start failed")
            if self._first.done() and not self._first.cancelled():
                self._first.exception()  # mark retrieved: it is re-raised, or moot after a cancel
            raise

    def offer(self, early: EarlyServer | None) -> None:
        """A process started at launch (:mod:`procman.process._early`) for the next spawn to take.

        The spawn adopts it only if its command line is exactly the one it
        would run (after admission has set ``-ngl``) and it is still alive;
        otherwise it is killed and the spawn goes ahead as usual. None: none.
        """
        if self._offered is not None and self._offered is not early:
            self._offered.discard()
        self._offered = early

    async def stop(self, reason: str = "stop requested") -> None:
        """SIGTERM the server's group, wait ``stop_grace``, SIGKILL it; idempotent."""
        if self._offered is not None:  # never taken: the start did not get as far as spawning
            self._offered.discard()
            self._offered = None
        task = self._task
        if task is None or task.done():
            if not self._state.is_final:
                self._set(State.STOPPED, reason)
            return
        self._set(State.STOPPING, reason)
        task.cancel()
        await asyncio.wait({task})
        self._set(State.STOPPED, reason)

    def recycle(self, reason: str) -> bool:
        """Kill the running process as if it had crashed for ``reason`` (a memory limit).

        The restart policy answers as for a crash, so repeated recycling ends
        in ``failed``. False when no ready process is running.
        """
        if self._recycle is None or self._recycle.done():
            return False
        self._recycle.set_result(reason)
        return True

    # -- internals -------------------------------------------------------------
    def _set(self, state: State, reason: str, *, log_tail: str = "") -> Event:
        previous, self._state = self._state, state
        self.last_reason = reason
        if state in {State.READY, State.UNHEALTHY}:
            self._available.set()
        else:
            self._available.clear()
        if state.is_final:
            self._settled.set()
        log.info("%s: %s -> %s (%s)", self.name, previous, state, reason)
        return self.bus.emit(
            self.name, state, previous, reason, pid=self._pid, port=self.port, log_tail=log_tail
        )

    async def _supervise(self, first: asyncio.Future[None]) -> None:
        try:
            while True:
                if self._group is not None and (refused := await self._workers_answer(self._group)):
                    self._set(State.FAILED, refused, log_tail=self._tail.text())
                    if not first.done():
                        first.set_exception(ServerError(refused, hint=self._group.hint))
                    return
                end, reason = await self._one_life(first)
                lost = await self._group.lost() if self._group is not None else ""
                if lost:  # llama-server aborts when a worker goes: the worker's fault, not its
                    reason = f"{reason}; {lost}"
                tail = self._tail.text()
                if not self._ever_ready:
                    error_type = StartupTimeout if end is _End.TIMEOUT else ServerError
                    message = f"llama-server for {self.name!r} did not start: {reason}"
                    self._set(State.FAILED, message, log_tail=tail)
                    if not first.done():
                        first.set_exception(
                            error_type(
                                message, log_tail=tail, hint=f"full log: {self.spec.log_path}"
                            )
                        )
                    return
                now = time.monotonic()
                decision = self.policy.on_crash(
                    now, reason, crash=end is not _End.ENDED and not lost
                )
                if decision.action is Action.GIVE_UP:
                    self.failed_until = now + decision.delay
                    self._set(State.FAILED, decision.reason, log_tail=tail)
                    return
                self.restarts += 1
                self._set(State.RESTARTING, decision.reason, log_tail=tail)
                await asyncio.sleep(decision.delay)  # a timed backoff; stop() cancels it
        except asyncio.CancelledError:
            if not first.done():
                first.set_exception(
                    ServerError(f"server {self.name!r} was stopped before it was ready")
                )
            raise
        except Exception as exc:  # a bug here must surface as a failed server, not vanish
            log.exception("supervision of %s failed", self.name)
            self._set(State.FAILED, f"internal error: {exc!r}", log_tail=self._tail.text())
            if not first.done():
                first.set_exception(exc)
        finally:
            self._pid = self._endpoint = None
            self.ready_since = None
            self._log.close()

    async def _workers_answer(self, group: WorkerGroup) -> str | None:
        """Until every RPC worker answers (None), or why the group cannot start."""
        return await group.answer(
            served=self._ever_ready,
            waiting=lambda why: self._set(State.WAITING_WORKERS, why),
            current=lambda: self.last_reason,
        )

    async def _one_life(self, first: asyncio.Future[None]) -> tuple[_End, str]:
        """Spawn, run until the process ends or must be killed; always reaps it."""
        note = ""
        for _ in range(_BIND_ATTEMPTS):
            early = self._take_offer()
            try:
                endpoint = self._new_endpoint(early)
                transport, child = await self._spawn(endpoint, note, early)
            except OSError as exc:
                return _End.EXITED, f"cannot run {self.spec.binary}: {exc.strerror or exc}"
            end = _End.EXITED
            try:
                spawned = early.started if early is not None else time.monotonic()
                end, reason, was_ready = await self._live(child, first, spawned, endpoint)
            finally:
                # a hung server (health failing, or stalled on a silent RPC worker) cannot
                # finish a polite stop: no grace period for it
                grace = 0.0 if end is _End.UNHEALTHY else self.spec.stop_grace
                await terminate(transport, child, grace, self.name)
                self._pid = self._endpoint = None
                self.ready_since = None
                endpoint.remove()
            taken = end is _End.EXITED and not was_ready and is_bind_failure(self._tail.text())
            if not taken or endpoint.socket is not None:
                return end, reason
            if self.spec.port is not None:
                return end, f"port {endpoint.port} on {self.spec.host} is in use"
            note = f" (port {endpoint.port} was taken meanwhile)"
            log.info("%s: %s taken before llama-server bound it; retrying", self.name, note)
        return _End.EXITED, f"could not bind a free port in {_BIND_ATTEMPTS} attempts"

    def _new_endpoint(self, early: EarlyServer | None) -> Endpoint:
        if early is not None:
            return Endpoint(socket=early.socket)
        if self.spec.listen == "unix":
            return Endpoint.unix(self.name)
        return Endpoint.tcp(self.name, self.spec.host, self.spec.port)

    def _take_offer(self) -> EarlyServer | None:
        early, self._offered = self._offered, None
        if early is None:
            return None
        same = early.argv == self.spec.argv(Endpoint(socket=early.socket))
        same = same and not self.spec.visible_devices  # started without its GPUs' environment
        if not same or early.process.poll() is not None:
            early.discard()  # started for another command line, or already dead
            return None
        return early

    def note(self, text: str) -> None:
        """Write a line of llamactl's own into the server's log (``llamactl logs``), such as
        the progress of the model's download before the first start."""
        stamp = datetime.now().astimezone().isoformat(timespec="seconds")
        self._log.write(f"--- llamactl {stamp}: {text}\n".encode())

    async def _spawn(
        self, endpoint: Endpoint, note: str, early: EarlyServer | None = None
    ) -> tuple[asyncio.SubprocessTransport, Child]:
        argv = self.spec.argv(endpoint)
        self._tail.clear()
        stamp = datetime.now().astimezone().isoformat(timespec="seconds")
        if early is not None:
            age = time.monotonic() - early.started
            note = f" (started at launch, adopted {age * 1000:.0f} ms later){note}"
        gpus = ",".join(self.spec.visible_devices)
        shown = f"CUDA_VISIBLE_DEVICES={gpus} {shlex.join(argv)}" if gpus else shlex.join(argv)
        self._log.write(f"\n--- llamactl {stamp}: {shown}{note}\n".encode())
        if early is not None:
            transport, child = await adopt(early, self._log, self._tail)
        else:
            endpoint.prepare()
            transport, child = await spawn(argv, self._log, self._tail, env=self.spec.env())
        self._pid, self._endpoint = transport.get_pid(), endpoint
        self._set(State.STARTING, f"spawned pid {self._pid} on {endpoint.address}{note}")
        return transport, child

    @staticmethod
    async def _probe(
        session: aiohttp.ClientSession, url: str, limit: float
    ) -> tuple[int | None, str]:
        import aiohttp  # speed

        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=limit)) as resp:
                await resp.read()
                return resp.status, f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return None, type(exc).__name__

    async def _live(
        self, child: Child, first: asyncio.Future[None], started: float, endpoint: Endpoint
    ) -> tuple[_End, str, bool]:
        import aiohttp  # speed

        # a fresh connection per probe: cheap locally, and never a stale keep-alive
        connector = endpoint.connector(force_close=True)
        # the key of a keyed TCP server: /health needs none, the stall probe (/slots) does
        headers = dict(endpoint.auth())
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
            return await self._watch(session, child, first, started, f"{endpoint.url}/health")

    async def _watch(
        self,
        session: aiohttp.ClientSession,
        child: Child,
        first: asyncio.Future[None],
        started: float,
        health_url: str,
    ) -> tuple[_End, str, bool]:
        spec, health = self.spec, self.spec.health
        deadline = started + spec.startup_timeout
        while True:
            status, _ = await self._probe(session, health_url, health.timeout)
            if status == 200:
                break
            if status is not None and self._state is State.STARTING:
                self._set(State.LOADING, f"{spec.model.name}: /health answers HTTP {status}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _End.TIMEOUT, f"not ready after {spec.startup_timeout:g} s; killed", False
            if await child.pause_loading(min(health.loading_interval, remaining)):
                return (
                    _End.EXITED,
                    f"exited while loading: {describe_exit(child.exited.result())}",
                    False,
                )

        self._ever_ready = True
        self.ready_since = time.monotonic()
        self.policy.on_ready(self.ready_since)
        self._set(State.READY, f"ready in {self.ready_since - started:.2f} s")
        if not first.done():
            first.set_result(None)
        return await self._while_ready(session, child, health_url)

    async def _while_ready(
        self, session: aiohttp.ClientSession, child: Child, health_url: str
    ) -> tuple[_End, str, bool]:
        """Watch a ready server until it exits, is recycled, hangs or stalls."""
        health = self.spec.health
        failures = 0
        if self._group is not None:
            self._group.ready()
        recycle = self._recycle = asyncio.get_running_loop().create_future()
        try:
            while True:
                await asyncio.wait(
                    {child.exited, recycle}, timeout=health.ready_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
                if recycle.done():
                    return _End.RECYCLED, recycle.result(), True
                if child.exited.done():
                    code = child.exited.result()
                    why = f"llama-server {describe_exit(code)}"
                    return (_End.EXITED if is_crash(code) else _End.ENDED), why, True
                if self._group is not None and (
                    stalled := await self._group.stalled(
                        session, health_url.removesuffix("/health")
                    )
                ):
                    return _End.UNHEALTHY, stalled, True
                failures, detail = await self._check(session, health_url, failures)
                if failures >= health.restart_after:
                    return (
                        _End.UNHEALTHY,
                        f"/health failed {failures} times in a row ({detail}); killed",
                        True,
                    )
        finally:
            self._recycle = None
            if not recycle.done():
                recycle.cancel()

    async def _check(
        self, session: aiohttp.ClientSession, health_url: str, failures: int
    ) -> tuple[int, str]:
        """One health poll of a ready server; the consecutive failures after it."""
        health = self.spec.health
        status, detail = await self._probe(session, health_url, health.timeout)
        if status == 200:
            if self._state is State.UNHEALTHY:
                self._set(State.READY, "health checks pass again")
            return 0, detail
        failures += 1
        if failures >= health.unhealthy_after and self._state is State.READY:
            self._set(State.UNHEALTHY, f"/health failed {failures} times in a row ({detail})")
        return failures, detail
