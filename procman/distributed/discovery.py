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
    name: str = ""
    """The DNS name whose A/AAAA records are the replicas, e.g. ``chat-pods.llm.svc.cluster.local``."""  # noqa: E501
    port: int = 8080
    """The replicas' port."""
    interval: float = 5.0
    """Seconds between two lookups."""
    nameserver: str | None = None
    """``IP`` or ``IP:PORT`` of the DNS server to ask; unset: the system's (``/etc/resolv.conf``)."""  # noqa: E501


def parse_discovery(value: Any) -> Discovery:
    """The ``discovery`` inline table; raises ValueError saying what is wrong."""
    from procman._units import parse_duration  # speed

    if not isinstance(value, dict):
        raise TypeError(f'expected a table such as {{ kind = "dns", name = "..." }}, got {value!r}')
    known = {"kind", "name", "port", "interval", "nameserver"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown keys {unknown} (known: {sorted(known)})")
    kind = value.get("kind", "dns")
    if kind != "dns":
        raise ValueError(
            f"kind {kind!r} is not supported: only 'dns' (a headless Service's records); "
            "Kubernetes EndpointSlice discovery is not built yet"
        )
    name, port = value.get("name"), value.get("port", 8080)
    if not isinstance(name, str) or not name:
        raise ValueError("name: the DNS name whose records are the replicas is missing")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port: expected a port number, got {port!r}")
    interval = parse_duration(value.get("interval", 5.0))
    if interval <= 0:
        raise ValueError("interval must be longer than zero")
    nameserver = value.get("nameserver")
    if nameserver is not None:
        _nameserver(nameserver)
    return Discovery(kind=kind, name=name, port=port, interval=interval, nameserver=nameserver)


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
        urls.append(f"http://{host}:{discovery.port}")
    return sorted(urls)
