"""The floor for any process in front of llama-server: bytes relayed, nothing else.

``python bench/_tcp_relay.py LISTEN_PORT UPSTREAM_PORT`` accepts on 127.0.0.1
and passes each connection's bytes both ways to llama-server on the same host,
as they arrive (no HTTP parsing, no routing, no queue), with the event loop
llamactl's router runs on. The router section measures it beside llamactl's
router and llama.cpp's: what it adds is what one more process in the path
costs on the machine, whatever that process does.
"""

from __future__ import annotations

import asyncio
import sys

from _common import HOST  # first: it puts the repository on sys.path

from procman import _loop


class _Upstream(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.upstream: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # kept: the loop holds tasks only weakly
        self.opening = asyncio.ensure_future(self._open(transport))  # type: ignore[arg-type]

    async def _open(self, client: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(
                lambda: _Upstream(client), HOST, self.upstream_port
            )
        except OSError:
            client.close()
            return
        self.upstream = upstream
        for data in self.early:
            upstream.write(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def _serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(upstream_port), HOST, port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    _loop.run(_serve(int(sys.argv[1]), int(sys.argv[2])))
