"""The router's endpoint table against the routes the pinned llama-server registers.

A llama.cpp bump that adds an endpoint fails this test until the endpoint is
either routed (``procman.router.routes.ROUTES``) or listed, with the reason it
is not, in ``NOT_ROUTED``.
"""

from __future__ import annotations

import re

from buildtools import BuildResult
from procman.router.routes import NOT_ROUTED, ROUTES

#: ctx_http.get ("/path", ...), ctx_http.post(...), ctx_http.del (...)
_REGISTERED = re.compile(r'ctx_http\.(get|post|del)\s*\(\s*"([^"]+)"')


def registered(default_build: BuildResult) -> set[tuple[str, str]]:
    import buildtools

    source = buildtools.provision()
    text = (source.path / "tools" / "server" / "server.cpp").read_text()
    found = {(method.upper().replace("DEL", "DELETE"), path) for method, path in
             _REGISTERED.findall(text)}  # fmt: skip
    assert len(found) > 30, "the pattern no longer matches server.cpp"
    return found


def test_every_route_llama_server_registers_is_routed_or_explained(
    default_build: BuildResult,
) -> None:
    ours = {(r.method, r.path.rstrip("/") + ("/:id_slot" if r.path.endswith("/") else ""))
            for r in ROUTES}  # fmt: skip
    unexplained = sorted(
        f"{method} {path}"
        for method, path in registered(default_build)
        if (method, path) not in ours and path not in NOT_ROUTED
    )
    assert not unexplained, f"route these or say why not (NOT_ROUTED): {unexplained}"


def test_every_route_of_the_table_exists_in_llama_server(default_build: BuildResult) -> None:
    theirs = registered(default_build)
    for route in ROUTES:
        path = route.path + ":id_slot" if route.path.endswith("/") else route.path
        assert (route.method, path) in theirs, f"{route.method} {path} is not llama-server's"
