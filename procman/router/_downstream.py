"""An answer's way back to the client: what :mod:`procman.router._upstream` reads from
llama-server, written to aiohttp's response or straight to the client's transport.

The head is re-made (hop-by-hop headers stay back, the router's own are added);
the body passes on as llama-server wrote it. Once the head is out, an error cuts
the connection rather than end the body as if complete, except for an event
stream that can still end cleanly with an error event (:func:`_end_stream_with_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable

from aiohttp import web

from procman.router._upstream import Answer, Head, kept

__all__ = ["encode_head", "to_response", "to_transport"]


async def to_response(
    request: web.Request, answer: Answer, skip: frozenset[str]
) -> web.StreamResponse:
    """Answer ``request`` with what llama-server answers; headers named in ``skip`` stay back."""
    head = answer.head.result()
    headers = kept(head.headers, skip)
    try:
        if answer.whole:
            await answer.done
            return web.Response(
                status=head.status,
                reason=head.reason,
                body=bytes(answer.body),
                headers=headers,  # so its Content-Type, not a default one
            )
        stream = web.StreamResponse(status=head.status, reason=head.reason)
        for key, value in headers:
            stream.headers.add(key, value)
        if head.chunked:
            stream.enable_chunked_encoding()
        else:
            stream.content_length = head.length
        await stream.prepare(request)  # the head goes out now (not buffered: a StreamResponse)
        # from here on the head is out: an error cuts the connection rather than end
        # the body cleanly as if complete (llama-server died mid-answer, bad framing,
        # or the client left)
        if request.transport is None:
            return stream
        answer.attach(request.transport)
        try:
            await answer.done
            await stream.write_eof()
        except (ConnectionError, ValueError):
            with contextlib.suppress(Exception):
                request.transport.abort()
        return stream
    finally:
        answer.release()


def _end_stream_with_error(
    sink: asyncio.Transport, answer: Answer, head: Head, exc: Exception
) -> bool:
    """An event stream whose server died mid-answer (an RPC worker lost, a crash): end it
    with an error event and the terminal chunk, as OpenAI's API reports an error in a
    stream, rather than cut the connection. Only where the client has every complete
    chunk so far and is still there; False otherwise (the caller cuts the connection)."""
    event_stream = any(
        k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in head.headers
    )
    if not (head.chunked and event_stream and answer.at_chunk_boundary) or sink.is_closing():
        return False
    error = {
        "error": {
            "message": f"the model server ended mid-answer ({exc}); the answer is incomplete",
            "type": "server_error",
            "code": "upstream_error",
        }
    }
    event = b"data: " + json.dumps(error).encode() + b"\n\n"
    sink.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
    sink.close()  # after the buffered writes: the connection carries nothing more
    return True


def encode_head(status: int, reason: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """An HTTP/1.1 response head; header bytes go back out as they came in."""
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


async def to_transport(
    sink: asyncio.Transport,
    answer: Answer,
    skip: frozenset[str],
    *,
    close: bool,
    extra: Iterable[tuple[str, str]] = (),
) -> bool:
    """:func:`to_response` for the router's front (``procman.router._front``): the answer is
    written to the client's transport itself, with the ``extra`` headers. Returns whether
    the connection may carry another request."""
    head = answer.head.result()
    headers = kept(head.headers, skip)
    headers += extra
    if close:
        headers.append(("Connection", "close"))
    try:
        if answer.whole:
            await answer.done
            body = bytes(answer.body)
            headers.append(("Content-Length", str(len(body))))
            sink.write(encode_head(head.status, head.reason, headers) + body)
            return not close
        if head.chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        else:
            headers.append(("Content-Length", str(head.length)))
        sink.write(encode_head(head.status, head.reason, headers))
        # from here on the head is out: an error cuts the connection (see relay)
        answer.attach(sink)
        try:
            await answer.done
        except (ConnectionError, ValueError) as exc:
            if not _end_stream_with_error(sink, answer, head, exc):
                sink.abort()
            return False
        if head.chunked:
            sink.write(b"0\r\n\r\n")  # the terminal chunk, which the scanner withheld
        return not close
    finally:
        answer.release()
