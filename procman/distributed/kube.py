"""Replicas from Kubernetes EndpointSlices: list, then watch, as every controller does.

``discovery = { kind = "kubernetes", namespace = "llm", selector =
"kubernetes.io/service-name=chat" }``: the ready addresses of the Service's
EndpointSlices are the replicas. The slices are listed once (which gives a
``resourceVersion``), then watched from there: each ADDED/MODIFIED/DELETED
event changes the set. A watch whose version has expired ends with ``410
Gone`` (as an HTTP status or an ERROR event): the slices are listed again.
Any other failure is retried after a pause, keeping the last set.

In a pod it reads the service account (token, CA, ``KUBERNETES_SERVICE_*``),
so the router's ServiceAccount needs ``list`` and ``watch`` on
``endpointslices`` in that namespace. The client is aiohttp, which the router
already uses: two GETs need no Kubernetes client library.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    import aiohttp

    from procman.distributed.discovery import Discovery

__all__ = ["SERVICE_ACCOUNT", "Gone", "KubeWatcher", "slice_urls"]

log = logging.getLogger(__name__)

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_RETRY = 1.0


class Gone(Exception):
    """The watch's resourceVersion expired (410): list again."""


def slice_urls(item: dict[str, Any], port: int | None, port_name: str | None) -> set[str]:
    """The replica URLs in one EndpointSlice: its ready endpoints at the chosen port."""
    ports = item.get("ports") or []
    number = port
    if number is None:
        chosen = [p for p in ports if port_name is None or p.get("name") == port_name]
        number = chosen[0].get("port") if chosen else None
    if not isinstance(number, int):
        return set()
    urls = set()
    for endpoint in item.get("endpoints") or []:
        if (endpoint.get("conditions") or {}).get("ready") is False:
            continue
        for address in endpoint.get("addresses") or []:
            host = f"[{address}]" if ":" in address else address
            urls.add(f"http://{host}:{number}")
    return urls


class KubeWatcher:
    """Keeps ``on_change`` told of the replicas a selector's EndpointSlices list."""

    def __init__(
        self,
        discovery: Discovery,
        on_change: Callable[[list[str]], None],
        *,
        root: Path = SERVICE_ACCOUNT,
        env: dict[str, str] | None = None,
    ) -> None:
        self.discovery = discovery
        self.on_change = on_change
        self.slices: dict[str, set[str]] = {}
        self.lists = 0
        """How many times the slices were listed (1, plus one per 410 or failure)."""
        env = dict(os.environ) if env is None else env
        api = discovery.api
        if api is None:
            host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
            api = f"https://{host}:{port}" if host and port else "https://kubernetes.default.svc"
        self.api = api.rstrip("/")
        token_file = root / "token"
        self.token = token_file.read_text().strip() if token_file.is_file() else None
        self.ca = root / "ca.crt"

    def _url(self, **query: str) -> str:
        d = self.discovery
        path = f"/apis/discovery.k8s.io/v1/namespaces/{quote(d.namespace or '')}/endpointslices"
        params = {"labelSelector": d.selector or "", **query}
        return self.api + path + "?" + "&".join(f"{k}={quote(v)}" for k, v in params.items())

    def _publish(self) -> None:
        self.on_change(sorted(set().union(*self.slices.values())))

    def _take(self, items: Iterable[dict[str, Any]]) -> None:
        d = self.discovery
        self.slices = {
            str(i.get("metadata", {}).get("name")): slice_urls(i, d.port_number, d.port_name)
            for i in items
        }

    async def run(self) -> None:
        """List, watch, list again on 410; until cancelled."""
        import aiohttp  # speed

        context = None
        if self.api.startswith("https://") and self.ca.is_file():
            context = ssl.create_default_context(cafile=str(self.ca))
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=None)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
            while True:
                try:
                    version = await self._list(http, context)
                    await self._watch(http, context, version)
                except Gone:
                    log.info("endpointslices watch expired (410): listing again")
                    await asyncio.sleep(0.1)  # never a hot loop against a server that repeats it
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError) as exc:
                    log.warning("endpointslices of %s: %s", self.discovery.selector, exc)
                    await asyncio.sleep(_RETRY)  # the API server is away: try again shortly

    async def _list(self, http: aiohttp.ClientSession, context: ssl.SSLContext | None) -> str:
        async with http.get(self._url(), ssl=context or True) as response:
            response.raise_for_status()
            body = await response.json()
        self.lists += 1
        self._take(body.get("items") or [])
        self._publish()
        return str(body.get("metadata", {}).get("resourceVersion", ""))

    async def _watch(
        self, http: aiohttp.ClientSession, context: ssl.SSLContext | None, version: str
    ) -> None:
        url = self._url(watch="1", resourceVersion=version, allowWatchBookmarks="true")
        async with http.get(url, ssl=context or True) as response:
            if response.status == 410:
                raise Gone
            response.raise_for_status()
            async for line in response.content:
                if line.strip():
                    self._event(json.loads(line))
        # the server ended the watch (its timeout): list again, as the loop does

    def _event(self, event: dict[str, Any]) -> None:
        kind, item = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if item.get("code") == 410:
                raise Gone
            raise ValueError(f"watch error: {item.get('message', item)}")
        if kind == "BOOKMARK":
            return
        name = str(item.get("metadata", {}).get("name"))
        d = self.discovery
        if kind == "DELETED":
            self.slices.pop(name, None)
        else:
            self.slices[name] = slice_urls(item, d.port_number, d.port_name)
        self._publish()
