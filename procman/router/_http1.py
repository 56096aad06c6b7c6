"""A strict HTTP/1.1 request parser: the head checked in a few passes, a chunked body read.

What a strict parser refuses, the router's front (:mod:`procman.router._front`)
answers at once with 400, 413, 431, 501 or 505 and the connection closed:
bare CR or LF, control characters, malformed request lines and header lines,
a header that may appear once appearing twice, both or neither framing,
unsupported codings or expectations, heads over :data:`MAX_HEAD` bytes or
:data:`MAX_HEADERS` lines, bodies over the limit. The same bytes go on to
llama-server, so nothing here is normalised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from procman.router._guard import Refusal

__all__ = ["MAX_HEAD", "MAX_HEADERS", "Dechunker", "Head", "bad", "parse_head"]

#: a request head (request line and headers) longer than this is 431, as aiohttp's limit
MAX_HEAD = 8190
MAX_HEADERS = 100
_MAX_CHUNK_LINE = 1024

#: RFC 9110 token characters: a method or a header name
_TCHARS = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN = re.compile(_TCHARS)
#: control characters allowed nowhere in a head (CR and LF only as line ends, counted apart)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: header lines, each "name:value" and CRLF: a name is a token, nothing before its colon
_BLOCK = re.compile(rf"(?:{_TCHARS}:[^\r\n]*\r\n)*")
#: one header line: its name and its value (the whitespace around it is stripped after)
_FIELD = re.compile(rf"({_TCHARS}):([^\r\n]*)\r\n")
_VERSION = re.compile(r"HTTP/[0-9]\.[0-9]")


@dataclass(slots=True)
class Head:
    """A parsed request head (see :func:`parse_head`)."""

    method: str
    target: str
    http11: bool
    headers: list[tuple[str, str]]
    """Every header as sent (names as sent, values trimmed)."""
    length: int = 0
    chunked: bool = False
    close: bool = False
    expect: bool = False
    """``Expect: 100-continue``."""
    host: str | None = None
    origin: str | None = None
    fetch_site: str | None = None
    authorization: str = ""
    x_api_key: str = ""
    preflight_headers: str | None = None

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


def bad(message: str, status: int = 400) -> Refusal:
    return Refusal(status, message, "bad_request")


#: headers the guard reads, by the ``Head`` field that keeps them
_CAPTURED = {
    "authorization": "authorization", "x-api-key": "x_api_key", "origin": "origin",
    "sec-fetch-site": "fetch_site", "access-control-request-headers": "preflight_headers",
}  # fmt: skip
#: headers that may appear once
_SINGLE = frozenset({"content-length", "transfer-encoding", "host"})


def parse_head(raw: bytes, max_body: int) -> Head | Refusal:  # noqa: PLR0911 - one per refusal
    """Parse a request head (without its final CRLF CRLF) as a strict HTTP/1.1 server does.

    The checks run in C over the whole head (one decode, counts, two regex passes
    and a split into fields by ``findall``); Python only looks at each field.
    """
    text = raw.decode("utf-8", "surrogateescape")  # the same bytes go on to llama-server
    crlf = text.count("\r\n")
    if text.count("\n") != crlf or text.count("\r") != crlf:
        return bad("bare CR or LF in the request head (lines must end in CRLF)")
    if _CONTROL.search(text):
        return bad("control character in the request head")
    first, _, block = text.partition("\r\n")
    head = _request_line(first)
    if isinstance(head, Refusal):
        return head
    block += "\r\n" if block else ""
    if not _BLOCK.fullmatch(block):  # also a space before ':', or a folded line
        return bad("malformed header line")
    fields = _FIELD.findall(block)
    if len(fields) > MAX_HEADERS:
        return bad(f"more than {MAX_HEADERS} header lines", 431)
    headers = head.headers
    once: dict[str, str] = {}
    connection = ""
    for key, raw_value in fields:
        value = raw_value.strip(" \t")
        headers.append((key, value))
        lowered = key.lower()
        if lowered in _SINGLE:
            if lowered in once:
                return bad(f"more than one {key} header")
            once[lowered] = value
        elif lowered == "connection":
            connection += "," + value.lower()
        elif lowered == "expect":
            if value.lower() != "100-continue":
                return bad(f"unsupported expectation {value[:40]!r}", 417)
            head.expect = True
        elif attribute := _CAPTURED.get(lowered):
            setattr(head, attribute, value)
    head.host = once.get("host")
    tokens = {t.strip() for t in connection.split(",")}
    head.close = "close" in tokens if head.http11 else "keep-alive" not in tokens
    return _framing(head, once, max_body) or head


def _request_line(line: str) -> Head | Refusal:
    parts = line.split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        return bad("malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if _VERSION.fullmatch(version):
            return bad("only HTTP/1.0 and HTTP/1.1 are served", 505)
        return bad("malformed request line")
    if not target.isascii() or not (target.startswith("/") or target == "*"):
        return bad("the request target must be an ASCII path")
    return Head(method=method, target=target, http11=version == "HTTP/1.1", headers=[])


def _framing(head: Head, once: dict[str, str], max_body: int) -> Refusal | None:
    """Where the body ends: ``Content-Length`` digits, or chunked (and not both)."""
    length, coding = once.get("content-length"), once.get("transfer-encoding")
    if coding is not None:
        if length is not None:
            return bad("both Content-Length and Transfer-Encoding")
        if not head.http11:
            return bad("Transfer-Encoding in an HTTP/1.0 request")
        if coding.lower() != "chunked":
            return bad(f"unsupported Transfer-Encoding {coding[:40]!r}", 501)
        head.chunked = True
    elif length is not None:
        # isdigit() alone takes "²" and other non-ASCII digits, which int() then refuses
        if not (length.isascii() and length.isdigit()) or len(length) > 18:
            return bad("invalid Content-Length")
        head.length = int(length)
        if head.length > max_body:
            return Refusal(413, f"the request body is over {max_body} bytes", "request_too_large")
    return None


class Dechunker:
    """Reads a chunked body out of a buffer as it grows; ``done`` once the trailers are in."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.body = bytearray()
        self.pos = 0  # where the next unread byte of the buffer is
        self.need = -1  # data bytes (with their CRLF) still to come; -1: a size line is next
        self.trailers = False
        self.done = False

    def feed(self, buffer: bytearray) -> Refusal | None:
        """Read what has arrived; a refusal if the framing is wrong or the body too big."""
        while not self.done:
            if self.trailers:
                end = buffer.find(b"\r\n", self.pos)
                if end < 0:
                    return None if len(buffer) - self.pos <= MAX_HEAD else bad("trailers", 431)
                self.done = end == self.pos
                self.pos = end + 2
            elif self.need < 0:
                end = buffer.find(b"\r\n", self.pos)
                if end < 0:
                    too_long = len(buffer) - self.pos > _MAX_CHUNK_LINE
                    return bad("chunk size line too long") if too_long else None
                refused = self._size_line(bytes(buffer[self.pos : end]))
                if refused is not None:
                    return refused
                self.pos = end + 2
            else:
                if len(buffer) - self.pos < self.need + 2:
                    return None
                end = self.pos + self.need
                if buffer[end : end + 2] != b"\r\n":
                    return bad("chunk data not followed by CRLF")
                self.body += buffer[self.pos : end]
                self.pos, self.need = end + 2, -1
        return None

    def _size_line(self, line: bytes) -> Refusal | None:
        digits = line.split(b";", 1)[0].strip(b" \t")
        if not digits or len(digits) > 15 or digits.strip(b"0123456789abcdefABCDEF"):
            return bad("malformed chunk size")
        size = int(digits, 16)
        if size == 0:
            self.trailers = True
        elif len(self.body) + size > self.limit:
            return Refusal(413, f"the body is over {self.limit} bytes", "request_too_large")
        else:
            self.need = size
        return None
