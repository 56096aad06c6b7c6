"""Models served by replicas elsewhere: health, picking, and the request's way there.

A :class:`ReplicaSet` is one ``[remote.NAME]`` model: a fixed list of
OpenAI-compatible endpoints (another ``llamactl serve``, a ``llama-server``).
Requests for it wait in the model's queue like a local model's; the replica
is picked when a request leaves the queue (late binding), by
:mod:`procman.router._pick`, and the request goes out over the router's own
raw upstream connections (:mod:`procman.router._upstream`), with the
replicas' key in place of the client's.

Health is active and passive. Every ``health_interval`` each replica's
``/health`` is probed: ``eject_after`` misses in a row eject it,
``readmit_after`` answers readmit it, and a readmitted replica's share grows
back over ``ramp`` seconds. A request that finds a replica refusing, hanging
up before an answer, or answering 502/503/504 ejects it at once, and is sent
once more to another replica: nothing had reached the client yet. The same
probe reads llama-server's counters (``/metrics?model=NAME``: a llamactl
replica passes it to the model's server, which needs ``--metrics``): the
prompt tokens served from its cache, and its deferred-requests gauge, which
``least_loaded`` adds to the requests this router has in flight there when the
replicas are ``shared`` with other routers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar, cast

from procman.distributed.remote import Pick, RemoteSection, parse_replica_url
from procman.process.endpoint import Endpoint
from procman.router import _upstream
from procman.router._forward import Failure
from procman.router._pick import Picker, prefix_key, session_key

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web

    from procman.router._forward import Forwarder, Reply
    from procman.router._front import Incoming
    from procman.router.scheduler import Scheduler

__all__ = ["Replica", "ReplicaSet", "ReplicaSets", "add_pick_route"]

log = logging.getLogger(__name__)

R = TypeVar("R")

#: answers that say the replica cannot serve now (not that the request is wrong)
_UNAVAILABLE = frozenset({502, 503, 504})
_COUNTERS = {
    "llamacpp:prompt_tokens_total": "prompt_tokens",
    "llamacpp:prompt_tokens_cached_total": "prompt_tokens_cached",
    "llamacpp:requests_deferred": "deferred",
}


@dataclass(eq=False)
class Replica:
    """One endpoint of a replica set and what the router knows of it."""

    url: str
    endpoint: Endpoint
    ramp: float = 10.0
    up: bool = True
    """Gets requests (until probes or a failure say otherwise)."""
    in_flight: int = 0
    """Requests this router has sent and not yet finished passing back."""
    deferred: int = 0
    """llama-server's ``requests_deferred`` gauge at the last probe (waiting for a slot)."""
    requests: int = 0
    failures: int = 0
    ejections: int = 0
    misses: int = 0
    successes: int = 0
    last_error: str = ""
    readmitted_at: float | None = None
    prompt_tokens: float | None = None
    prompt_tokens_cached: float | None = None

    @property
    def available(self) -> bool:
        return self.up

    shared: bool = False
    """Other routers use it too: their waiting requests (``deferred``) count as load."""

    @property
    def load(self) -> int:
        return self.in_flight + self.deferred if self.shared else self.in_flight

    @property
    def weight(self) -> float:
        if self.readmitted_at is None or self.ramp <= 0:
            return 1.0
        share = (time.monotonic() - self.readmitted_at) / self.ramp
        if share >= 1:
            self.readmitted_at = None
            return 1.0
        return 0.1 + 0.9 * share

    @property
    def hit_rate(self) -> float | None:
        """Prompt tokens served from llama-server's cache, of all its prompt tokens (its
        ``prompt_tokens_total`` counts the tokens it evaluated, the cached ones apart)."""
        if self.prompt_tokens is None or self.prompt_tokens_cached is None:
            return None
        total = self.prompt_tokens + self.prompt_tokens_cached
        return self.prompt_tokens_cached / total if total else None

    def eject(self, reason: str) -> None:
        self.last_error = reason
        self.successes = 0
        if self.up:
            self.up = False
            self.ejections += 1
            log.warning("replica %s ejected: %s", self.url, reason)

    def status(self) -> dict[str, Any]:
        return {
            "url": self.url, "state": "up" if self.up else "ejected", "in_flight": self.in_flight,
            "deferred": self.deferred, "requests": self.requests, "failures": self.failures,
            "ejections": self.ejections, "weight": round(self.weight, 2),
            "prompt_tokens": self.prompt_tokens,
            "prompt_tokens_cached": self.prompt_tokens_cached, "hit_rate": self.hit_rate,
            "last_error": self.last_error,
        }  # fmt: skip


@dataclass(eq=False)
class ReplicaSet:
    """One remote model: its replicas, how to pick one, and their health (see the module)."""

    name: str
    section: RemoteSection
    api_key: str | None = field(default=None, repr=False)
    replicas: list[Replica] = field(init=False)
    pick_seconds: float = 0.0
    """Time spent picking, over ``picks`` requests (the picking cost per request)."""
    picks: int = 0

    def __post_init__(self) -> None:
        self.replicas = []
        self.picker = Picker([])
        self.set_urls(self.section.replicas, ramp=False)
        self._prober: asyncio.Task[None] | None = None
        self._finder: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def set_urls(self, urls: Iterable[str], *, ramp: bool = True) -> None:
        """The replicas are now ``urls``: known ones keep their state and counts, new ones
        start with a ramp (discovered: a Service lists only ready pods), gone ones go."""
        known = {r.url: r for r in self.replicas}
        replicas = []
        for text in urls:
            url = str(parse_replica_url(text))
            replica = known.get(url)
            if replica is None:
                where = parse_replica_url(url)
                endpoint = Endpoint(host=where.host, port=where.port, api_key=self.api_key)
                replica = Replica(url, endpoint, ramp=self.section.ramp, shared=self.section.shared)
                replica.readmitted_at = time.monotonic() if ramp else None
                log.info("replica %s of %s added", url, self.name)
            replicas.append(replica)
        if [r.url for r in replicas] != [r.url for r in self.replicas]:
            self.replicas = replicas  # one assignment: a request in flight keeps its replica
            self.picker = Picker([r.url for r in replicas])

    @property
    def aliases(self) -> tuple[str, ...]:
        return self.section.aliases

    @property
    def ready(self) -> bool:
        return any(r.up for r in self.replicas)

    # -- picking ------------------------------------------------------------------------------
    def pick(
        self, payload: Any, headers: Sequence[tuple[str, str]], exclude: Iterable[Replica] = ()
    ) -> Replica | None:
        """The replica for a request (None: none is available)."""
        started = time.perf_counter()
        replicas: Sequence[Replica] = self.replicas
        excluded = set(exclude)
        if excluded:
            replicas = [r for r in replicas if r not in excluded]
        picker = self.picker
        index: int | None
        if excluded:  # a retry: the least loaded of the rest
            index = picker.least_loaded(replicas)
        else:
            section = self.section
            match section.pick:
                case Pick.LEAST_LOADED:
                    index = picker.least_loaded(replicas)
                case Pick.ROUND_ROBIN:
                    index = picker.round_robin(replicas)
                case Pick.PREFIX:
                    key = prefix_key(payload, section.prefix_bytes)
                    index = picker.by_key(key, replicas, section.load_factor)
                case Pick.SESSION:
                    key = session_key(headers, section.session_header, payload)
                    index = picker.by_key(key, replicas, float("inf"))
        self.pick_seconds += time.perf_counter() - started
        self.picks += 1
        return None if index is None else replicas[index]

    # -- the request's way ----------------------------------------------------------------------
    async def forward(
        self, forwarder: Forwarder, incoming: Incoming, reply: Reply[R], *,
        streamed: bool, payload: Any,
    ) -> R:  # fmt: skip
        """Send ``incoming`` to a picked replica and ``reply`` with its answer; once more to
        another replica when the first fails before anything reached the client."""
        raw = not streamed or incoming.http11
        pool = None if streamed else forwarder.pool
        timeout = forwarder.settings.connect_timeout
        tried: list[Replica] = []
        while True:
            replica = self.pick(payload, incoming.headers, tried)
            if replica is None:
                return reply.fail(self._none_left(forwarder, tried))
            last = len(tried) >= 1 or len(self.replicas) == 1
            tried.append(replica)
            replica.in_flight += 1
            replica.requests += 1
            try:
                if not raw:
                    return await _http10(forwarder, reply, replica, incoming.body)
                answer = await _upstream.open_stream(
                    replica.endpoint, incoming.method, incoming.target, incoming.headers,
                    incoming.body, connect_timeout=timeout, pool=pool,
                )  # fmt: skip
                status = answer.head.result().status
                if status in _UNAVAILABLE and not last:
                    answer.close()
                    replica.failures += 1
                    replica.eject(f"answered HTTP {status}")
                    continue
                return await reply.send(answer)
            except (OSError, TimeoutError, ValueError) as exc:
                # nothing reached the client: refused, timed out, hung up before an answer
                # (SIGKILLed mid-request), or an answer that is not HTTP
                replica.failures += 1
                replica.eject(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
                if last:
                    message = f"model {self.name!r}: replica {replica.url} failed: {exc}"
                    return reply.fail(Failure(502, message, "server_error", "upstream_error"))
            except Exception as exc:
                import aiohttp  # speed: only HTTP/1.0 streams use aiohttp's client

                if not isinstance(exc, aiohttp.ClientError):
                    raise
                replica.failures += 1
                replica.eject(str(exc))
                if last:
                    message = f"model {self.name!r}: replica {replica.url} failed: {exc}"
                    return reply.fail(Failure(502, message, "server_error", "upstream_error"))
            finally:
                replica.in_flight -= 1

    def _none_left(self, forwarder: Forwarder, tried: Sequence[Replica]) -> Failure:
        reasons = "; ".join(f"{r.url}: {r.last_error or 'ejected'}" for r in self.replicas)
        retry = (("Retry-After", str(forwarder.settings.retry_after)),)
        message = f"no replica of model {self.name!r} is available ({reasons})"
        return Failure(503, message, "server_error", "no_replica", retry)

    # -- health ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start probing (each replica now, then every ``health_interval``)."""
        import aiohttp  # speed

        if self._prober is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.section.health_timeout)
            )
            found = self.section.discovery
            if found is not None and found.kind == "kubernetes":
                from procman.distributed.kube import KubeWatcher  # speed

                watcher = KubeWatcher(found, self.set_urls)
                self._finder = asyncio.create_task(watcher.run())
            elif found is not None:
                await self.discover()
                self._finder = asyncio.create_task(self._discover_forever())
            await self.probe_all()
            self._prober = asyncio.create_task(self._probe_forever())

    async def discover(self) -> None:
        """Look the replicas up again (``discovery``); a failed lookup keeps the last list."""
        from procman.distributed.discovery import resolve_replicas  # speed

        if self.section.discovery is not None:
            urls = await resolve_replicas(self.section.discovery)
            if urls is not None:
                self.set_urls(urls)

    async def _discover_forever(self) -> None:
        interval = self.section.discovery.interval if self.section.discovery else 5.0
        while True:
            await asyncio.sleep(interval)  # a period: DNS has no push
            await self.discover()

    async def stop(self) -> None:
        if self._finder is not None:
            self._finder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._finder
            self._finder = None
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.section.health_interval)  # a period, not a wait on state
            await self.probe_all()

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(r) for r in self.replicas))

    async def _probe(self, replica: Replica) -> None:
        import aiohttp  # speed

        session = self._session
        if session is None:  # pragma: no cover - start() made it
            return
        headers = dict(replica.endpoint.auth())
        try:
            async with session.get(f"{replica.url}/health", headers=headers) as response:
                ok = response.status == 200
                reason = f"/health answered {response.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            ok, reason = False, f"/health: {type(exc).__name__} {exc}".rstrip()
        section = self.section
        if ok:
            replica.misses = 0
            replica.successes += 1
            if not replica.up and replica.successes >= section.readmit_after:
                replica.up = True
                replica.readmitted_at = time.monotonic()
                log.info("replica %s readmitted", replica.url)
            if replica.up:
                await self._scrape(session, replica, headers)
            return
        replica.successes = 0
        replica.misses += 1
        replica.last_error = reason
        if replica.misses >= section.eject_after:
            replica.eject(f"{replica.misses} probes missed ({reason})")

    async def _scrape(
        self, session: aiohttp.ClientSession, replica: Replica, headers: Mapping[str, str]
    ) -> None:
        """llama-server's counters, where it runs with ``--metrics`` (else left unknown)."""
        import aiohttp  # speed

        try:
            url = f"{replica.url}/metrics?model={self.name}"
            async with session.get(url, headers=headers) as response:
                if response.status != 200:
                    return
                text = await response.text()
        except (aiohttp.ClientError, OSError, TimeoutError, UnicodeDecodeError):
            return
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            attribute = _COUNTERS.get(name)
            if attribute is None:
                continue
            with contextlib.suppress(ValueError):
                number = float(value)
                setattr(replica, attribute, int(number) if attribute == "deferred" else number)

    def status(self) -> dict[str, Any]:
        """A row of ``/admin/status``'s ``remote`` list."""
        cost = self.pick_seconds / self.picks if self.picks else None
        return {
            "name": self.name, "pick": str(self.section.pick), "ready": self.ready,
            "pick_seconds_mean": cost, "picks": self.picks,
            "replicas": [r.status() for r in self.replicas],
        }  # fmt: skip


async def _http10(forwarder: Forwarder, reply: Reply[R], replica: Replica, body: bytes) -> R:
    """A stream for an HTTP/1.0 client (rare): re-framed by aiohttp, as for a local model."""
    request = reply.request
    if request is None:  # pragma: no cover - the lean front takes HTTP/1.1 only
        raise RuntimeError("an HTTP/1.0 stream needs aiohttp's request")
    return cast("R", await forwarder.stream_http10(request, replica.endpoint, body))


class ReplicaSets:
    """Every remote model of a router, found by name or alias."""

    def __init__(self, sets: Iterable[ReplicaSet] = ()) -> None:
        self.sets = list(sets)
        self._names = {alias: s for s in self.sets for alias in (s.name, *s.aliases)}

    @classmethod
    def configured(cls, remote: Mapping[str, RemoteSection], scheduler: Scheduler) -> ReplicaSets:
        """The ``[remote.NAME]`` models of a config (keys from the environment), each with
        its queue in ``scheduler``."""
        from procman.distributed.remote import replica_key  # speed
        from procman.router.scheduler import QueueSettings  # speed

        sets = []
        for name, section in remote.items():
            sets.append(ReplicaSet(name, section, api_key=replica_key(name, section)))
            queue = QueueSettings(
                slots=section.parallel, maxsize=section.queue, order=section.order
            )
            scheduler.add(name, queue)
        return cls(sets)

    def find(self, model: str | None) -> ReplicaSet | None:
        return self._names.get(model) if model is not None else None

    def __bool__(self) -> bool:
        return bool(self.sets)

    @staticmethod
    def owns(upstream: object) -> TypeGuard[ReplicaSet]:
        return isinstance(upstream, ReplicaSet)

    async def start(self) -> None:
        await asyncio.gather(*(s.start() for s in self.sets))

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.sets))

    def status(self) -> list[dict[str, Any]]:
        return [s.status() for s in self.sets]

    def metrics(self) -> str:
        """Prometheus text lines for every replica (appended to ``GET /metrics``)."""
        series: dict[str, tuple[str, str, list[str]]] = {
            "up": ("gauge", "1 if the replica gets requests, 0 if ejected", []),
            "in_flight": ("gauge", "requests this router has in flight at the replica", []),
            "requests_total": ("counter", "requests sent to the replica", []),
            "failures_total": ("counter", "requests that failed at the replica", []),
            "ejections_total": ("counter", "times the replica was ejected", []),
            "prompt_tokens_total": ("counter", "llama-server's prompt tokens evaluated", []),
            "prompt_tokens_cached_total": ("counter", "and those served from its cache", []),
        }
        for s in self.sets:
            for r in s.replicas:
                labels = f'{{model="{s.name}",replica="{r.url}"}}'
                values = {
                    "up": int(r.up), "in_flight": r.in_flight, "requests_total": r.requests,
                    "failures_total": r.failures, "ejections_total": r.ejections,
                    "prompt_tokens_total": r.prompt_tokens,
                    "prompt_tokens_cached_total": r.prompt_tokens_cached,
                }  # fmt: skip
                for key, value in values.items():
                    if value is not None:
                        series[key][2].append(f"llamactl_replica_{key}{labels} {value}")
        lines = []
        for key, (kind, help_text, samples) in series.items():
            name = f"llamactl_replica_{key}"
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
        lines += [
            "# HELP llamactl_replica_pick_seconds time spent picking a replica",
            "# TYPE llamactl_replica_pick_seconds summary",
        ]
        for s in self.sets:
            lines.append(f'llamactl_replica_pick_seconds_sum{{model="{s.name}"}} {s.pick_seconds}')
            lines.append(f'llamactl_replica_pick_seconds_count{{model="{s.name}"}} {s.picks}')
        return "\n".join(lines) + "\n"


def add_pick_route(app: web.Application, sets: ReplicaSets) -> None:
    """``POST /admin/pick/{name}``: the replica a request body would go to now, without
    sending it (behind the router's key, as the admin API is): how a user checks that two
    routers agree, or where a conversation lands."""
    from aiohttp import web  # speed

    async def pick(request: web.Request) -> web.Response:
        remote = sets.find(request.match_info["name"])
        if remote is None:
            message = f"no remote model {request.match_info['name']!r}"
            body = {"error": {"message": message, "type": "invalid_request_error"}}
            return web.json_response(body, status=404)
        try:
            payload = await request.json()
        except ValueError:
            payload = None
        headers = list(request.headers.items())
        replica = remote.pick(payload, headers)
        return web.json_response({"replica": replica.url if replica else None})

    app.router.add_post("/admin/pick/{name}", pick)
