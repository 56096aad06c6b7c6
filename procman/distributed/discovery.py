"""Replicas found in DNS: the A/AAAA records of a name (a Kubernetes headless Service).

A headless Service has one record per ready pod, so its records are the
model's replicas as Kubernetes sees them; they are read again every
``interval``. A name that does not exist or has no records means no replica
(every pod gone); a lookup that fails otherwise (a timeout, a broken server)
keeps the last answer, so a DNS hiccup does not empty the pool.

Lookups use dnspython's asyncio resolver (the ``dns`` extra), which can ask a
given ``nameserver`` instead of the system's: that is how the tests point it
at a DNS server of their own.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

__all__ = ["Discovery", "parse_discovery", "resolve_replicas"]


@dataclass(frozen=True, kw_only=True)
class Discovery:
    """Where a remote model's replicas are looked up."""

    kind: str = "dns"
    """``"dns"`` (a name's A/AAAA records) or ``"kubernetes"`` (EndpointSlices, see
    :mod:`procman.distributed.kube`)."""
    name: str = ""
    """dns: the name whose A/AAAA records are the replicas, e.g. ``chat-pods.llm.svc.cluster.local``."""  # noqa: E501
    port: int | None = None
    """The replicas' port (dns: default 8080; kubernetes: default the slices' own)."""
    interval: float = 5.0
    """dns: seconds between two lookups."""
    nameserver: str | None = None
    """dns: ``IP`` or ``IP:PORT`` of the DNS server to ask; unset: the system's."""
    namespace: str | None = None
    """kubernetes: the namespace of the EndpointSlices."""
    selector: str | None = None
    """kubernetes: their label selector, e.g. ``kubernetes.io/service-name=chat``."""
    port_name: str | None = None
    """kubernetes: the slice port to use, by name (default: the first)."""
    api: str | None = None
    """kubernetes: the API server's URL; unset: the pod's own (service account)."""

    @property
    def port_number(self) -> int | None:
        return self.port


def parse_discovery(value: Any) -> Discovery:
    """The ``discovery`` inline table; raises ValueError saying what is wrong."""
    from procman._units import parse_duration  # speed

    if not isinstance(value, dict):
        raise TypeError(f'expected a table such as {{ kind = "dns", name = "..." }}, got {value!r}')
    kind = value.get("kind", "dns")
    if kind == "kubernetes":
        return _kubernetes(value)
    if kind != "dns":
        raise ValueError(f"kind {kind!r}: expected 'dns' or 'kubernetes'")
    known = {"kind", "name", "port", "interval", "nameserver"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown keys {unknown} (known: {sorted(known)})")
    name, port = value.get("name"), _port(value.get("port", 8080))
    if not isinstance(name, str) or not name:
        raise ValueError("name: the DNS name whose records are the replicas is missing")
    interval = parse_duration(value.get("interval", 5.0))
    if interval <= 0:
        raise ValueError("interval must be longer than zero")
    nameserver = value.get("nameserver")
    if nameserver is not None:
        _nameserver(nameserver)
    return Discovery(kind=kind, name=name, port=port, interval=interval, nameserver=nameserver)


def _port(port: Any) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port: expected a port number, got {port!r}")
    return port


def _kubernetes(value: dict[str, Any]) -> Discovery:
    known = {"kind", "namespace", "selector", "port", "port_name", "api"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown keys {unknown} (known: {sorted(known)})")
    texts = {k: value.get(k) for k in ("namespace", "selector", "port_name", "api")}
    for key, text in texts.items():
        if text is not None and not isinstance(text, str):
            raise TypeError(f"{key}: expected a string, got {text!r}")
    if not texts["namespace"] or not texts["selector"]:
        raise ValueError(
            'namespace and selector are needed, e.g. { kind = "kubernetes", namespace = '
            '"llm", selector = "kubernetes.io/service-name=chat" }'
        )
    api = texts["api"]
    if api is not None and not api.startswith("https://"):
        from urllib.parse import urlsplit  # speed

        host = urlsplit(api).hostname or ""
        if not (api.startswith("http://") and host in ("127.0.0.1", "localhost", "::1")):
            raise ValueError(f"api: {api!r}: the API server is reached over https")
    port = value.get("port")
    return Discovery(
        kind="kubernetes", namespace=texts["namespace"], selector=texts["selector"],
        port=None if port is None else _port(port), port_name=texts["port_name"], api=api,
    )  # fmt: skip


def _nameserver(text: Any) -> tuple[str, int]:
    if not isinstance(text, str):
        raise TypeError(f"nameserver: expected 'IP' or 'IP:PORT', got {text!r}")
    host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "53")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"nameserver: {text!r} is not an IP address (and port)") from None
    if not port.isdigit():
        raise ValueError(f"nameserver: bad port in {text!r}")
    return host, int(port)


async def resolve_replicas(discovery: Discovery, lifetime: float = 2.0) -> list[str] | None:
    """The replicas' URLs now, sorted (so routers agree on the list); None when the lookup
    failed (keep the last list)."""
    try:
        import dns.asyncresolver  # speed: only for discovery
        import dns.exception  # speed
        import dns.resolver  # speed
    except ImportError:  # pragma: no cover - checked when the config is loaded
        return None
    resolver = dns.asyncresolver.Resolver(configure=discovery.nameserver is None)
    if discovery.nameserver is not None:
        host, port = _nameserver(discovery.nameserver)
        resolver.nameservers = [host]
        resolver.port = port
    resolver.lifetime = lifetime
    addresses: set[str] = set()
    for kind in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(discovery.name, kind, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue  # no pods (or none of this family)
        except (dns.exception.DNSException, OSError):
            return None
        addresses.update(str(record) for record in answer)
    urls = []
    for address in addresses:
        host = f"[{address}]" if ":" in address else address
        urls.append(f"http://{host}:{discovery.port or 8080}")
    return sorted(urls)
