"""The access rules (procman.router._guard): Host, Origin and API key, as plain strings."""

from __future__ import annotations

import pytest

from procman.router._guard import Guard, Refusal


def check(guard: Guard, **request: object) -> int:
    """The status a request gets: 0 when it may go on."""
    fields: dict[str, object] = {
        "path": "/v1/chat/completions",
        "host": "127.0.0.1:8080",
        "origin": None,
    }
    fields.update(request)
    refusal = guard.check(**fields)  # type: ignore[arg-type]
    return 0 if refusal is None else refusal.status


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8080", True),
        ("127.0.0.1", True),
        ("127.1.2.3:80", True),  # all of 127/8 is loopback
        ("localhost:8080", True),
        ("LOCALHOST.:8080", True),  # case and a trailing dot do not matter
        ("app.localhost:8080", True),  # RFC 6761: browsers resolve *.localhost locally
        ("[::1]:8080", True),
        ("[::1]", True),
        ("evil.example", False),  # DNS rebinding: the page's own name
        ("evil.example:8080", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.evil.example", False),
        ("10.0.0.5:8080", False),
        ("[::ffff:10.0.0.5]", False),
        ("", False),
        ("user@127.0.0.1", False),
        ("127.0.0.1:8080/x", False),
    ],
)
def test_host_rules(host: str, allowed: bool) -> None:
    guard = Guard()
    guard.bind("127.0.0.1")
    assert guard.host_allowed(host) is allowed
    status = check(guard, host=host)
    assert status == (0 if allowed else 403)


def test_allowed_hosts_names_suffixes_and_star() -> None:
    guard = Guard(allowed_hosts=["llm.lan", ".corp.example"])
    assert guard.host_allowed("llm.lan:8080")
    assert guard.host_allowed("corp.example") and guard.host_allowed("a.b.corp.example:1")
    assert not guard.host_allowed("other.lan") and not guard.host_allowed("xcorp.example")
    assert Guard(allowed_hosts=["*"]).host_allowed("anything.example")


def test_the_bound_address_is_allowed_and_a_wildcard_means_this_machine() -> None:
    guard = Guard()
    guard.bind("192.0.2.7")
    assert guard.host_allowed("192.0.2.7:8080")
    assert not guard.host_allowed("192.0.2.8:8080")
    wide = Guard()
    wide.bind("0.0.0.0")
    import socket

    assert wide.host_allowed(f"{socket.gethostname()}:8080")
    assert not wide.host_allowed("evil.example")


def test_http11_without_host_is_400_and_http10_may_omit_it() -> None:
    guard = Guard()
    assert check(guard, host=None) == 400
    assert check(guard, host=None, http11=False) == 0


@pytest.mark.parametrize(
    ("origin", "fetch_site", "status"),
    [
        (None, None, 0),  # not a browser, or a same-origin GET
        ("http://127.0.0.1:8080", None, 0),  # this endpoint's own origin (a page it serves)
        ("http://localhost:3000", None, 0),  # listed
        ("http://evil.example", None, 403),
        ("null", None, 403),  # sandboxed frames and file:// pages
        ("http://localhost:8080", None, 403),  # another origin, though also local
        (None, "cross-site", 403),  # a no-cors request from another site
        (None, "same-origin", 0),
    ],
)
def test_origin_rules_without_a_key(
    origin: str | None, fetch_site: str | None, status: int
) -> None:
    guard = Guard(cors_origins=["http://localhost:3000"])
    assert check(guard, origin=origin, fetch_site=fetch_site) == status


def test_a_valid_key_lets_a_foreign_origin_through_and_a_wrong_one_does_not() -> None:
    guard = Guard(api_key="s3cret")
    evil = {"origin": "http://evil.example"}
    assert check(guard, authorization="Bearer s3cret", **evil) == 0
    assert check(guard, x_api_key="s3cret", **evil) == 0  # Anthropic's clients
    assert check(guard, authorization="Bearer nope", **evil) == 403
    assert check(guard, **evil) == 403
    assert check(guard) == 401  # same origin, no key
    assert check(guard, authorization="bearer s3cret") == 0  # the scheme is case-insensitive
    assert check(guard, authorization="Basic s3cret") == 401


def test_health_is_public_but_still_needs_a_good_host() -> None:
    guard = Guard(api_key="k")
    assert check(guard, path="/health", origin="http://evil.example") == 0
    assert check(guard, path="/health", host="evil.example") == 403


def test_refusals_say_what_to_change() -> None:
    guard = Guard()
    refusal = guard.check(path="/v1/models", host="evil.example", origin=None)
    assert isinstance(refusal, Refusal) and "allowed_hosts" in refusal.message
    refusal = guard.check(path="/v1/models", host="localhost", origin="http://evil.example")
    assert isinstance(refusal, Refusal) and "cors_origins" in refusal.message


def test_cors_headers_and_preflight() -> None:
    guard = Guard(cors_origins=["http://localhost:*"])
    host = "127.0.0.1:8080"
    assert guard.cors_headers("http://localhost:5173", host) == [
        ("Access-Control-Allow-Origin", "http://localhost:5173"),
        ("Vary", "Origin"),
    ]
    assert guard.cors_headers("http://evil.example", host) == []
    assert guard.cors_headers(None, host) == []
    status, headers = guard.preflight(
        host=host, origin="http://localhost:5173", request_headers="authorization, content-type"
    )
    assert status == 204
    assert ("Access-Control-Allow-Headers", "authorization, content-type") in headers
    assert ("Access-Control-Allow-Origin", "http://localhost:5173") in headers
    status, headers = guard.preflight(host=host, origin="http://evil.example", request_headers=None)
    assert status == 403 and not any(k.startswith("Access-Control") for k, _ in headers)
