"""A small authoritative DNS server on loopback UDP, for discovery tests.

It answers A and AAAA questions from a table the test changes while it runs
(``records[name] = [...]``), NXDOMAIN for names it does not know, and nothing
at all while ``silent`` is set (a server that times out). Messages are parsed
and written by dnspython, the same library the router resolves with, so what
goes over the socket is real DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


@dataclass(eq=False)
class DnsServer(asyncio.DatagramProtocol):
    records: dict[str, list[str]] = field(default_factory=dict)
    """Name (without the final dot) -> addresses, IPv4 and IPv6 mixed."""
    silent: bool = False
    queries: int = 0
    transport: asyncio.DatagramTransport | None = None
    port: int = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's
        self.port = int(transport.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        self.queries += 1
        if self.silent or self.transport is None:
            return
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text().rstrip(".")
        if name not in self.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            family = 4 if question.rdtype == dns.rdatatype.A else 6
            found = [a for a in self.records[name] if ipaddress.ip_address(a).version == family]
            if found:
                kind = "A" if family == 4 else "AAAA"
                response.answer.append(dns.rrset.from_text(question.name, 1, "IN", kind, *found))
        self.transport.sendto(response.to_wire(), addr)

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"


async def start_dns() -> DnsServer:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        DnsServer, local_addr=("127.0.0.1", 0)
    )
    protocol.connection_made(transport)  # asyncio calls it soon after; the port is wanted now
    return protocol
