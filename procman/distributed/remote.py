"""The ``[remote.NAME]`` tables: a model that other servers serve, behind this router.

A remote model has no process here: its replicas are OpenAI-compatible
endpoints (another ``llamactl serve``, a ``llama-server``) listed in
``replicas``. The router queues its requests like a local model's and picks a
replica when one leaves the queue (:mod:`procman.router.replicas`).

Two rules are checked here, before anything listens: a replica beyond this
machine needs a key (``replica_api_key_env`` names the environment variable
that holds it; the client's own key is never passed on), and the variable
must be set when the config is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from procman.config import _tables
from procman.distributed.discovery import Discovery, parse_discovery
from procman.errors import ConfigError
from procman.router.scheduler import Order

__all__ = [
    "KINDS", "Pick", "RemoteSection", "ReplicaUrl", "parse_remote", "parse_replica_url",
    "replica_key",
]  # fmt: skip


class Pick(StrEnum):
    """How a replica is chosen for a request leaving the queue."""

    LEAST_LOADED = "least_loaded"
    PREFIX = "prefix"
    ROUND_ROBIN = "round_robin"
    SESSION = "session"


@dataclass(frozen=True, kw_only=True)
class RemoteSection:
    """A ``[remote.NAME]`` table: a model served by replicas on other machines (or other ``llamactl serve`` processes); NAME is what clients send as ``model``, and what the replicas must know it by."""  # noqa: E501

    replicas: tuple[str, ...] = ()
    """The replicas' base URLs, e.g. ``["http://10.0.0.2:8080", "http://10.0.0.3:8080"]`` (plain HTTP: put TLS in front on untrusted networks)."""  # noqa: E501
    discovery: Discovery | None = None
    """Find the replicas instead: in DNS, ``{ kind = "dns", name = "chat-pods.llm.svc.cluster.local", port = 8080, interval = "5s" }`` (a headless Service: one A/AAAA record per ready pod; ``nameserver = "IP:PORT"`` asks a given server; the ``dns`` extra), or in Kubernetes, ``{ kind = "kubernetes", namespace = "llm", selector = "kubernetes.io/service-name=chat" }`` (the ready endpoints of its EndpointSlices, watched; ``port``/``port_name``, ``api``). Needs ``replica_api_key_env``."""  # noqa: E501
    pick: Pick = Pick.LEAST_LOADED
    """Which replica gets a request: ``"least_loaded"`` (fewest in flight), ``"prefix"`` (the same conversation to the same replica, for its prompt cache), ``"round_robin"`` or ``"session"`` (by the ``session_header`` header or the body's ``user``)."""  # noqa: E501
    replica_api_key_env: str | None = None
    """Environment variable holding the key sent to the replicas (``Authorization: Bearer``); required for a replica beyond loopback. The client's key is never passed on."""  # noqa: E501
    aliases: tuple[str, ...] = ()
    """Other names clients may send for this model."""
    shared: bool = False
    """Other routers send to these replicas too: ``least_loaded`` then adds each replica's own count of waiting requests (llama-server's ``requests_deferred``, read at each probe) to this router's in-flight count. Off: this router's count alone (the gauge would count its own requests twice, late)."""  # noqa: E501
    parallel: int = 32
    """Requests sent to the replicas at once; more wait in the queue, and a replica is picked when one leaves it."""  # noqa: E501
    queue: int = 256
    """Requests that may wait; one more gets HTTP 429 with ``Retry-After``."""
    order: Order = Order.FIFO
    """Which waiting request goes next: ``"fifo"`` or ``"lifo"``."""
    health_interval: float = 0.5
    """Seconds between two ``/health`` probes of each replica."""
    health_timeout: float = 0.75
    """Seconds a probe may take before it counts as missed (a silent replica is ejected after about ``eject_after`` x (``health_interval`` + this))."""  # noqa: E501
    eject_after: int = 2
    """Missed probes in a row after which a replica gets no requests (a refused connection or a 5xx ejects at once)."""  # noqa: E501
    readmit_after: int = 2
    """Answered probes in a row after which an ejected replica gets requests again."""
    ramp: float = 10.0
    """Seconds over which a readmitted replica's share grows back to a full one (``least_loaded`` and ``prefix``)."""  # noqa: E501
    prefix_bytes: int = 2048
    """With ``"prefix"``: bytes of the conversation's start (system prompt and first user message) that choose the replica."""  # noqa: E501
    load_factor: float = 1.25
    """With ``"prefix"``: most in-flight requests a replica takes, as a multiple of the average, before the next replica on the ring gets the request (bounded load)."""  # noqa: E501
    session_header: str = "x-session-id"
    """With ``"session"``: the request header naming the session (else the body's ``user``)."""


@dataclass(frozen=True)
class ReplicaUrl:
    """A replica's address, parsed: ``http://HOST:PORT``."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_replica_url(text: str) -> ReplicaUrl:
    """Raises ValueError saying what is wrong with ``text``."""
    parts = urlsplit(text.strip())
    if parts.scheme == "https":
        raise ValueError(
            f"{text!r}: https replicas are not supported yet (put them on a private network, "
            "or a TLS-terminating proxy on each replica's machine)"
        )
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{text!r} is not a replica URL such as http://10.0.0.2:8080")
    if parts.path.strip("/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{text!r}: give the server's root URL (no path, query or user)")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    return ReplicaUrl(parts.hostname, port)


def _replica_loopback(url: ReplicaUrl) -> bool:
    from procman.router.listen import is_loopback  # speed: resolves names

    return is_loopback(url.host)


def _pick(value: Any) -> Pick:
    try:
        return Pick(value)
    except ValueError:
        known = ", ".join(f"'{p}'" for p in Pick)
        raise ValueError(f"expected one of {known}, got {value!r}") from None


def _fraction(minimum: float) -> Any:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {value!r}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum:g}, got {value}")
        return float(value)

    return convert


def _urls(value: Any) -> tuple[str, ...]:
    urls = tuple(str(parse_replica_url(v)) for v in _tables.strings(value))
    if len(set(urls)) != len(urls):
        raise ValueError("a replica is listed twice")
    return urls


def _keys() -> dict[str, Any]:
    return {
        "replicas": _urls,
        "discovery": parse_discovery,
        "pick": _pick,
        "replica_api_key_env": _tables.string,
        "aliases": _tables.strings,
        "shared": _tables.boolean,
        "parallel": _tables.integer(1),
        "queue": _tables.integer(0),
        "order": _tables.order,
        "health_interval": _tables.duration,
        "health_timeout": _tables.duration,
        "eject_after": _tables.integer(1),
        "readmit_after": _tables.integer(1),
        "ramp": _fraction(0),
        "prefix_bytes": _tables.integer(16),
        "load_factor": _fraction(1),
        "session_header": _tables.string,
    }


#: the config reference's type column for these keys
KINDS = {
    "replicas": "list of URLs", "discovery": "table", "pick": "string",
    "replica_api_key_env": "string", "shared": "boolean", "parallel": "integer",
    "health_interval": "duration", "health_timeout": "duration",
    "eject_after": "integer", "readmit_after": "integer", "ramp": "seconds",
    "prefix_bytes": "integer", "load_factor": "number", "session_header": "string",
}  # fmt: skip


def parse_remote(tables: Any, env: Mapping[str, str] | None = None) -> dict[str, RemoteSection]:
    """The ``[remote.NAME]`` tables, validated; ``env`` (default ``os.environ``) holds keys."""
    env = os.environ if env is None else env
    if not isinstance(tables, dict):
        raise ConfigError(f"remote: expected tables, got {tables!r}")
    remote = {}
    for name, table in tables.items():
        if not _tables.NAME.match(name):
            raise ConfigError(f"remote.{name}: invalid model name")
        section = RemoteSection(**_tables.section(table, f"remote.{name}.", _keys()))
        if not section.replicas and section.discovery is None:
            raise ConfigError(
                f"remote.{name}.replicas: missing",
                hint='e.g. replicas = ["http://10.0.0.2:8080", "http://10.0.0.3:8080"], or '
                'discovery = { kind = "dns", name = "chat-pods.llm.svc.cluster.local" }',
            )
        if section.replicas and section.discovery is not None:
            raise ConfigError(
                f"remote.{name}: give replicas or discovery, not both",
                hint="a headless Service's records already list every ready pod",
            )
        if section.discovery is not None:
            _check_discovery(name, section)
        replica_key(name, section, env)  # refused now, not at the first request
        remote[name] = section
    return remote


def _check_discovery(name: str, section: RemoteSection) -> None:
    if section.replica_api_key_env is None:
        raise ConfigError(
            f"remote.{name}.discovery: replicas found in DNS may be anywhere: a key is required",
            hint="name the environment variable that holds it: replica_api_key_env = "
            '"LLAMACTL_REPLICA_KEY"',
        )
    if section.discovery is not None and section.discovery.kind == "kubernetes":
        return
    try:
        import dns.asyncresolver  # noqa: F401  # speed: only to say it is missing, early
    except ImportError:
        raise ConfigError(
            f"remote.{name}.discovery: DNS discovery needs the dnspython package",
            hint="pip install 'llamactl-server[dns]'",
        ) from None


def replica_key(
    name: str, section: RemoteSection, env: Mapping[str, str] | None = None
) -> str | None:
    """The key sent to ``section``'s replicas (from its environment variable), or None for
    replicas on this machine; raises ConfigError when a key is needed and missing."""
    env = os.environ if env is None else env
    if section.replica_api_key_env is not None:
        key = env.get(section.replica_api_key_env)
        if not key:
            raise ConfigError(
                f"remote.{name}.replica_api_key_env: ${section.replica_api_key_env} is not "
                "set (or empty)",
                hint=f"export {section.replica_api_key_env}=<the replicas' API key>",
            )
        return key
    for url in section.replicas:
        if not _replica_loopback(parse_replica_url(url)):
            raise ConfigError(
                f"remote.{name}: replica {url} is beyond this machine and no key is set "
                "for it: anyone who reaches it could use it",
                hint="start the replicas with an API key and name the environment variable "
                'that holds it: replica_api_key_env = "LLAMACTL_REPLICA_KEY"',
            )
    return None
