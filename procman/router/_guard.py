"""Who may talk to the router: the Host, Origin and API-key rules, decided in one place.

A router left running on a desktop, on loopback and usually without a key,
is reachable by every web page its user opens. Three rules keep pages out:

* **Host** (DNS rebinding, as against Ollama in CVE-2024-28224): a page whose
  own name its DNS later points at 127.0.0.1 sends requests with that name
  in ``Host``. Only loopback names and addresses, the address the router is
  bound to (every address of this machine when bound to a wildcard) and the
  configured ``allowed_hosts`` pass; anything else is 403. HTTP/1.1 without
  ``Host`` is 400.
* **Origin** (cross-site requests): any page may POST ``text/plain`` without
  a preflight. A request whose ``Origin`` is neither this endpoint's own nor
  listed in ``cors_origins`` (or, without ``Origin``, that says
  ``Sec-Fetch-Site: cross-site``) is 403, unless it carries the valid API
  key. Listed origins get ``Access-Control-Allow-Origin`` and preflights are
  answered here; llama-server's own CORS headers never reach the client.
* **API key**: with a key, everything but ``/health`` needs it, as
  ``Authorization: Bearer KEY`` or (Anthropic's clients) ``x-api-key: KEY``.

Both fronts (:mod:`procman.router._front` and the aiohttp application) ask the same
:class:`Guard`; each only turns its :class:`Refusal` into bytes.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["PAGE_PATHS", "PUBLIC_PATHS", "Guard", "Refusal", "local_addresses"]

#: answered without a key and whatever the origin (a page cannot read them cross-site)
PUBLIC_PATHS = frozenset({"/health", "/v1/health"})
#: the dashboard's own files (no data in them): a browser navigating there sends no key,
#: so they are served without one; the Host and Origin rules still apply
PAGE_PATHS = frozenset({"/ui", "/ui/", "/ui/app.js", "/ui/ui.css"})
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})  # noqa: S104 - names, not a bind
_HOST_SYNTAX = re.compile(r"^(?:\[[0-9a-f:.%a-z]+\]|[a-z0-9._-]+)(?::[0-9]{1,5})?$")
_CACHE_MAX = 1024
#: what a preflight may ask for; the browser still needs the key for anything but /health
_METHODS = "GET, POST, OPTIONS"
_MAX_AGE = "600"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused, as an HTTP answer (OpenAI's error body)."""

    status: int
    message: str
    code: str
    kind: str = "invalid_request_error"
    headers: tuple[tuple[str, str], ...] = ()


def local_addresses() -> set[str]:
    """Names and addresses of this machine: what ``Host`` may say when bound to a wildcard."""
    found = {socket.gethostname().lower()}
    found.add(next(iter(found)).split(".", 1)[0])
    try:
        import psutil  # speed

        for addresses in psutil.net_if_addrs().values():
            for address in addresses:
                if address.family in (socket.AF_INET, socket.AF_INET6):
                    found.add(str(address.address).split("%", 1)[0].lower())
    except (ImportError, OSError):
        pass
    return found


def _host_name(value: str) -> str:
    """``Host``'s name or address without port or brackets, lowercased, no trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rpartition(":")[0].rstrip(".") if ":" in value else value.rstrip(".")


class Guard:
    """The access rules of one router (see the module docstring)."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        allowed_hosts: Iterable[str] = (),
        cors_origins: Iterable[str] = (),
    ) -> None:
        self._bound: str | None = None
        self.configure(api_key=api_key, allowed_hosts=allowed_hosts, cors_origins=cors_origins)

    def configure(
        self, *, api_key: str | None, allowed_hosts: Iterable[str], cors_origins: Iterable[str]
    ) -> None:
        """Take new rules (a config reload); the next request is judged by them."""
        self._key = api_key.encode() if api_key else None
        hosts = [h.strip().lower().rstrip(".") for h in allowed_hosts if h.strip()]
        self._any_host = "*" in hosts
        self._suffixes = tuple(h for h in hosts if h.startswith("."))
        self._hosts = {h.strip("[]") for h in hosts if not h.startswith(".") and h != "*"}
        self._origins = tuple(o.strip().rstrip("/") for o in cors_origins if o.strip())
        self._host_ok: dict[str, bool] = {}
        self._origin_ok: dict[tuple[str, str], bool] = {}
        if self._bound is not None:
            self.bind(self._bound)

    @property
    def needs_key(self) -> bool:
        return self._key is not None

    def bind(self, host: str) -> None:
        """Also allow the address the router listens on (every local one for a wildcard)."""
        self._bound = host
        name = _host_name(host) if host.startswith("[") else host.strip().lower()
        if name in _WILDCARDS:
            self._hosts |= local_addresses()
        else:
            self._hosts.add(name)
        self._host_ok.clear()

    # -- the rules ----------------------------------------------------------------------------
    def host_allowed(self, value: str) -> bool:
        """Whether a ``Host`` header value names this endpoint (cached per value)."""
        known = self._host_ok.get(value)
        if known is None:
            known = self._decide_host(value)
            if len(self._host_ok) >= _CACHE_MAX:
                self._host_ok.clear()
            self._host_ok[value] = known
        return known

    def _decide_host(self, value: str) -> bool:
        if not _HOST_SYNTAX.match(value.strip().lower()):
            return False
        if self._any_host:
            return True
        name = _host_name(value)
        if name in _LOOPBACK_NAMES or name.endswith(".localhost") or name in self._hosts:
            return True
        if any(name.endswith(s) or name == s[1:] for s in self._suffixes):
            return True
        try:
            return ipaddress.ip_address(name.split("%", 1)[0]).is_loopback
        except ValueError:
            return False

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        """Whether a browser at ``origin`` may call: this endpoint's own origin, or listed."""
        key = (origin, host or "")
        known = self._origin_ok.get(key)
        if known is None:
            trimmed = origin.rstrip("/")
            scheme, sep, rest = trimmed.partition("://")
            same = bool(sep) and host is not None and rest.lower() == host.strip().lower()
            known = (same and scheme in ("http", "https")) or any(
                fnmatch.fnmatchcase(trimmed, pattern) for pattern in self._origins
            )
            if len(self._origin_ok) >= _CACHE_MAX:
                self._origin_ok.clear()
            self._origin_ok[key] = known
        return known

    def authorised(self, authorization: str = "", x_api_key: str = "") -> bool:
        """Whether the request carries the key (constant-time); True when there is none."""
        if self._key is None:
            return True
        token = None
        if authorization:
            scheme, _, rest = authorization.partition(" ")
            token = rest.strip() if scheme.lower() == "bearer" else None
        if token is None and x_api_key:
            token = x_api_key.strip()
        if token is None:
            return False
        return hmac.compare_digest(token.encode("utf-8", "surrogateescape"), self._key)

    def check(
        self,
        *,
        path: str,
        host: str | None,
        origin: str | None,
        fetch_site: str | None = None,
        authorization: str = "",
        x_api_key: str = "",
        http11: bool = True,
    ) -> Refusal | None:
        """None if the request may go on, else how to refuse it."""
        if host is None:
            if http11:
                return Refusal(400, "HTTP/1.1 requests need a Host header", "missing_host")
        elif not self.host_allowed(host):
            return Refusal(
                403,
                f"Host {host[:100]!r} is not allowed (DNS rebinding protection); list it in "
                "[server] allowed_hosts or --allowed-host to reach llamactl by that name",
                "host_not_allowed",
                kind="permission_error",
            )
        if path in PUBLIC_PATHS:
            return None
        key_ok = self.authorised(authorization, x_api_key)
        if origin is not None:
            foreign = not self.origin_allowed(origin, host)
        else:
            foreign = fetch_site is not None and fetch_site.strip().lower() == "cross-site"
        if foreign and not (key_ok and self._key is not None):
            what = f"origin {origin[:100]!r}" if origin is not None else "a cross-site page"
            return Refusal(
                403,
                f"cross-origin request from {what} refused; list the origin in [server] "
                "cors_origins or --cors-origin to let that page call llamactl",
                "origin_not_allowed",
                kind="permission_error",
            )
        if not key_ok and path not in PAGE_PATHS:
            return Refusal(
                401,
                "invalid or missing API key",
                "invalid_api_key",
                kind="authentication_error",
                headers=(("WWW-Authenticate", "Bearer"),),
            )
        return None

    def check_headers(
        self, path: str, headers: Mapping[str, str], *, http11: bool = True
    ) -> Refusal | None:
        """:meth:`check` for a request whose headers are a mapping (aiohttp's, case-blind)."""
        return self.check(
            path=path,
            host=headers.get("Host"),
            origin=headers.get("Origin"),
            fetch_site=headers.get("Sec-Fetch-Site"),
            authorization=headers.get("Authorization", ""),
            x_api_key=headers.get("x-api-key", ""),
            http11=http11,
        )

    # -- CORS ---------------------------------------------------------------------------------
    def cors_headers(self, origin: str | None, host: str | None) -> list[tuple[str, str]]:
        """Headers that let the browser at ``origin`` read the answer (none if not allowed)."""
        if origin is None or not self.origin_allowed(origin, host):
            return []
        return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]

    def preflight(
        self, *, host: str | None, origin: str | None, request_headers: str | None
    ) -> tuple[int, list[tuple[str, str]]]:
        """The status and headers answering ``OPTIONS`` (a preflight when it has ``Origin``)."""
        if origin is None:  # not a preflight: what may be asked
            return 204, [("Allow", _METHODS)]
        if not self.origin_allowed(origin, host):
            return 403, [("Vary", "Origin")]
        headers = [
            *self.cors_headers(origin, host),
            ("Access-Control-Allow-Methods", _METHODS),
            ("Access-Control-Max-Age", _MAX_AGE),
        ]
        if request_headers:
            headers.append(("Access-Control-Allow-Headers", request_headers))
        return 204, headers
