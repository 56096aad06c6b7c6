"""llama.cpp's RPC workers as seen from here: their endpoints, and a probe that asks one
what it is.

The probe speaks the first three commands of ggml's RPC protocol (b11312,
``ggml/src/ggml-rpc/ggml-rpc.cpp``), the same ones ``llama-server --rpc`` sends
before anything else: ``HELLO`` (the protocol version), ``DEVICE_COUNT`` and
``GET_DEVICE_MEMORY`` per device. Every request is ``cmd (1 byte) | size (u64) |
payload`` and every answer ``size (u64) | payload``, little-endian.

A worker serves one client at a time (``listen(fd, 1)`` and a serial accept
loop): while a leader is connected, a probe is accepted by the kernel but never
answered. So a probe that connects and hears nothing within its timeout says
"busy or silent", never "down"; ``llamactl worker``'s status endpoint tells the
two apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

from procman.errors import ConfigError

__all__ = [
    "DEADLOCK_NOTE",
    "PROTOCOL",
    "DeviceMemory",
    "WorkerProbe",
    "compatible",
    "format_endpoint",
    "is_loopback",
    "parse_endpoint",
    "parse_endpoints",
    "probe",
    "probe_all",
]

#: the protocol llama-server b11312 speaks (``RPC_PROTO_*_VERSION`` in ggml-rpc.h)
PROTOCOL = (7, 0, 0)
#: upstream's open report for three or more workers (builds 10620-10819; not known fixed)
DEADLOCK_NOTE = (
    "more than two RPC workers: llama.cpp has an open deadlock report for three or more "
    "(ggml-org/llama.cpp#28487); the stall watchdog restarts the group if it hangs"
)
#: ggml-rpc-server's default port
DEFAULT_PORT = 50052

_HELLO, _DEVICE_COUNT, _DEVICE_MEMORY = 14, 15, 11
_CAPS = 24  # RPC_CONN_CAPS_SIZE: transport capabilities; all zero = plain TCP
_HEAD = struct.Struct("<BQ")
_SIZE = struct.Struct("<Q")


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``HOST`` alone: port 50052) -> (host, port), or :class:`ConfigError`.

    ggml-rpc-server binds only IPv4 literals (``-H``), and llama-server's
    ``--rpc`` splits at the first ``:``: names and IPv6 are refused here, where
    the message can say so, rather than by an abort in llama-server.
    """
    host, sep, port_text = text.strip().partition(":")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ConfigError(
            f"RPC endpoint {text!r}: {host!r} is not an IPv4 address",
            hint="write the worker as IP:PORT, e.g. 192.168.1.20:50052 "
            "(ggml-rpc-server binds IPv4 addresses only)",
        ) from None
    if not sep:
        return host, DEFAULT_PORT
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(
            f"RPC endpoint {text!r}: the port must be a number from 1 to 65535",
            hint="write the worker as IP:PORT, e.g. 127.0.0.1:50052",
        )
    return host, int(port_text)


def parse_endpoints(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``a:p,b:p`` (or a list of them) -> normalised ``host:port`` strings, no duplicates."""
    items = text.split(",") if isinstance(text, str) else list(text)
    endpoints = [format_endpoint(*parse_endpoint(item)) for item in items if item.strip()]
    if not endpoints:
        raise ConfigError("no RPC endpoint given", hint="e.g. --rpc 127.0.0.2:50052")
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError(f"an RPC endpoint is listed twice: {', '.join(endpoints)}")
    return tuple(endpoints)


def format_endpoint(host: str, port: int) -> str:
    return f"{host}:{port}"


def is_loopback(endpoint: str) -> bool:
    return ipaddress.IPv4Address(parse_endpoint(endpoint)[0]).is_loopback


def compatible(version: tuple[int, int, int], ours: tuple[int, int, int] = PROTOCOL) -> bool:
    """llama-server's own rule: same major version, and the worker's minor not newer."""
    return version[0] == ours[0] and version[1] <= ours[1]


def _version_text(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


@dataclass(frozen=True, kw_only=True)
class DeviceMemory:
    index: int
    free: int
    total: int


@dataclass(frozen=True, kw_only=True)
class WorkerProbe:
    """What one probe of a worker found."""

    endpoint: str
    reachable: bool
    """Something accepted a TCP connection there."""
    answered: bool = False
    """It answered HELLO: a worker, free for a leader."""
    protocol: tuple[int, int, int] | None = None
    devices: tuple[DeviceMemory, ...] = ()
    error: str = ""
    """Why it is not usable, in words: refused, busy or silent, another protocol."""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.answered and self.protocol is not None and compatible(self.protocol)

    @property
    def free(self) -> int:
        return sum(d.free for d in self.devices)

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["protocol"] = _version_text(self.protocol) if self.protocol else None
        data["usable"] = self.usable
        return data


async def _ask(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    cmd: int,
    payload: bytes,
    expect: int | None,
) -> bytes:
    """One command; ``expect``: the answer's size (None: any size up to 4 KiB)."""
    writer.write(_HEAD.pack(cmd, len(payload)) + payload)
    await writer.drain()
    (size,) = _SIZE.unpack(await reader.readexactly(_SIZE.size))
    if size != expect and (expect is not None or not 3 <= size <= 4096):
        raise _Unexpected(f"answered command {cmd} with {size} bytes, expected {expect}")
    return await reader.readexactly(size)


class _Unexpected(Exception):
    pass


async def probe(endpoint: str, *, timeout: float = 3.0) -> WorkerProbe:  # noqa: ASYNC109 - per step
    """Ask the worker at ``endpoint`` for its protocol version and device memory.

    Never raises for what the worker does: the result says what was found.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    host, port = parse_endpoint(endpoint)

    def result(**kwargs: Any) -> WorkerProbe:
        return WorkerProbe(endpoint=endpoint, seconds=round(loop.time() - started, 4), **kwargs)

    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        why = "connection refused" if isinstance(exc, ConnectionRefusedError) else str(exc)
        return result(reachable=False, error=f"unreachable: {why or type(exc).__name__}")
    try:
        try:
            hello = await asyncio.wait_for(
                # any size: another protocol version may answer a longer or shorter
                # HELLO, and its first three bytes still say which version it is
                _ask(reader, writer, _HELLO, bytes(_CAPS), None),
                timeout,
            )
        except TimeoutError:
            return result(
                reachable=True,
                error=f"no answer within {timeout:g} s: busy with a leader, or silent (stopped)",
            )
        version = (hello[0], hello[1], hello[2])
        if not compatible(version):
            return result(
                reachable=True,
                answered=True,
                protocol=version,
                error=f"the worker speaks RPC protocol {_version_text(version)}, this "
                f"llama-server speaks {_version_text(PROTOCOL)}: build both from the same "
                "llama.cpp version",
            )
        count_raw = await asyncio.wait_for(_ask(reader, writer, _DEVICE_COUNT, b"", 4), timeout)
        (count,) = struct.unpack("<I", count_raw)
        devices = []
        for index in range(min(count, 64)):
            raw = await asyncio.wait_for(
                _ask(reader, writer, _DEVICE_MEMORY, struct.pack("<I", index), 16), timeout
            )
            free, total = struct.unpack("<QQ", raw)
            devices.append(DeviceMemory(index=index, free=free, total=total))
        return result(reachable=True, answered=True, protocol=version, devices=tuple(devices))
    except (_Unexpected, asyncio.IncompleteReadError, OSError, TimeoutError) as exc:
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, asyncio.IncompleteReadError):
            detail = "it closed the connection"
        return result(
            reachable=True,
            error=f"not a ggml-rpc-server of protocol {_version_text(PROTOCOL)}: {detail}",
        )
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1.0)


async def probe_all(
    endpoints: tuple[str, ...] | list[str],
    *,
    timeout: float = 2.0,  # noqa: ASYNC109 - per step of each probe, not a deadline
) -> list[WorkerProbe]:
    """:func:`probe` every endpoint at once."""
    return list(await asyncio.gather(*(probe(e, timeout=timeout) for e in endpoints)))
