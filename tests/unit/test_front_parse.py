"""The front's request-head parser, case by case: what a strict HTTP/1.1 server refuses.

``parse_head`` gets the head without its final CRLF CRLF, as the front cuts it.
"""

from __future__ import annotations

import pytest

from procman.router._guard import Refusal
from procman.router._http1 import Head, parse_head

MAX_BODY = 1000
OK = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: 2"


def parse(text: str | bytes) -> Head | Refusal:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return parse_head(raw, MAX_BODY)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        # line endings and control characters
        ("POST / HTTP/1.1\nHost: a\nContent-Length: 2", 400),  # bare LF throughout
        (OK.replace("\r\nContent", "\nContent"), 400),  # one bare LF
        (OK.replace("\r\nContent", "\rContent"), 400),  # bare CR
        (OK + "\r\nX-A: a\rb", 400),  # CR inside a value
        (OK + "\r\nX-A: a\x00b", 400),  # NUL inside a value
        (OK + "\r\nX-A: a\x01b", 400),  # another control character
        ("POST /v1/x\x00y HTTP/1.1\r\nHost: a", 400),  # NUL in the target
        # request line
        ("POST  /v1 HTTP/1.1\r\nHost: a", 400),  # two spaces
        ("POST /v1 HTTP/1.1 extra\r\nHost: a", 400),
        ("PO(ST /v1 HTTP/1.1\r\nHost: a", 400),  # not a token
        ("POST v1 HTTP/1.1\r\nHost: a", 400),  # not a path
        ("POST http://evil/ HTTP/1.1\r\nHost: a", 400),  # absolute form: we are no proxy
        ("POST /v1/caf\u00e9 HTTP/1.1\r\nHost: a", 400),  # non-ASCII target
        ("POST /v1 HTTP/2.0\r\nHost: a", 505),
        ("POST /v1 HTTQ/1.1\r\nHost: a", 400),
        # header lines
        (OK + "\r\nno colon here", 400),
        (OK + "\r\nX-A : spaced name", 400),
        (OK + "\r\n folded continuation", 400),  # obs-fold
        (OK + "\r\nX(A): bad name", 400),
        (OK + "".join(f"\r\nX-{i}: v" for i in range(100)), 431),  # 101 header lines
        # framing
        (OK.replace("Length: 2", "Length: \u00b2"), 400),  # a non-ASCII digit isdigit() takes
        (OK.replace("Length: 2", "Length: -2"), 400),
        (OK.replace("Length: 2", "Length: 0x2"), 400),
        (OK.replace("Length: 2", "Length: 2, 2"), 400),
        (OK + "\r\nContent-Length: 2", 400),  # twice
        (OK.replace("Length: 2", "Length: 1000000000000"), 413),  # over the body limit
        (OK.replace("Length: 2", "Length: 99999999999999999999"), 400),  # absurdly long
        (OK + "\r\nTransfer-Encoding: chunked", 400),  # both: request smuggling
        ("POST /v1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked", 501),
        ("POST /v1 HTTP/1.0\r\nTransfer-Encoding: chunked", 400),
        (
            "POST /v1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
            "Transfer-Encoding: chunked",
            400,
        ),
        (OK + "\r\nHost: other", 400),  # two Host headers
        (OK + "\r\nExpect: magic", 417),
    ],
)
def test_refused(head: str, status: int) -> None:
    got = parse(head)
    assert isinstance(got, Refusal), got
    assert got.status == status, got.message


def test_a_plain_post_is_parsed() -> None:
    got = parse(OK + "\r\nAuthorization: Bearer k\r\nOrigin: http://x\r\nX-Api-Key: z")
    assert isinstance(got, Head)
    assert (got.method, got.target, got.path, got.http11) == (
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        True,
    )
    assert (got.length, got.chunked, got.close, got.host) == (2, False, False, "127.0.0.1:8080")
    assert (got.authorization, got.origin, got.x_api_key) == ("Bearer k", "http://x", "z")


def test_chunked_keep_alive_and_close() -> None:
    chunked = parse("POST /v1?a=b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked")
    assert isinstance(chunked, Head) and chunked.chunked and chunked.path == "/v1"
    closing = parse(OK + "\r\nConnection: keep-alive, close")
    assert isinstance(closing, Head) and closing.close
    old = parse("GET /health HTTP/1.0")
    assert isinstance(old, Head) and old.close and not old.http11 and old.host is None
    kept = parse("GET /health HTTP/1.0\r\nConnection: Keep-Alive")
    assert isinstance(kept, Head) and not kept.close


def test_values_are_trimmed_and_non_utf8_bytes_survive() -> None:
    got = parse(OK.encode() + b"\r\nX-A: \t caf\xe9 \t")
    assert isinstance(got, Head)
    value = dict(got.headers)["X-A"]
    assert value.encode("utf-8", "surrogateescape") == b"caf\xe9"


def test_options_star_is_a_target() -> None:
    got = parse("OPTIONS * HTTP/1.1\r\nHost: a")
    assert isinstance(got, Head) and got.target == "*"
