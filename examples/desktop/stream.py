"""One streamed chat completion from an OpenAI-compatible server, cancellable from any thread.

Standard library only. ``Answer.run`` (in a worker thread) reads the
server-sent events and hands each piece of text to a callback;
``Answer.cancel`` (from the GUI thread) shuts the connection down, which ends
the read at once and tells llama-server to stop generating: it notices the
closed connection on its next write and cancels the request.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Done:
    """How an answer ended."""

    tokens: int
    """Pieces of text received (llama-server streams one token per piece)."""
    tokens_per_second: float | None
    """The server's own generation speed (its ``timings``), else pieces per second here."""
    finish_reason: str | None
    """``stop``, ``length``, or None when cancelled."""
    cancelled: bool


class Answer:
    """``POST {url}/v1/chat/completions`` with ``stream: true``."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.url = urlsplit(url)
        self.api_key = api_key
        self.body = {
            **(extra or {}),
            "messages": messages,
            "max_tokens": max_tokens,
            "stream": True,
        }
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self.cancelled = False

    def run(self, on_text: Callable[[str, int, float | None], object]) -> Done:
        """Read the answer; ``on_text(piece, tokens so far, tokens/s so far)`` per piece.

        Raises ``OSError`` (or ``http.client.HTTPException``) when the request fails,
        unless it was cancelled.
        """
        host = self.url.hostname or "127.0.0.1"
        conn = http.client.HTTPConnection(host, self.url.port, timeout=600)
        with self._lock:
            if self.cancelled:
                return Done(0, None, None, cancelled=True)
            self._conn = conn
        reading = _Reading(on_text)
        try:
            response = self._post(conn)
            if not self.cancelled:  # cancelled while connecting: no socket was there to shut
                for raw in response:
                    if not reading.line(raw.strip()):
                        break
        except (OSError, http.client.HTTPException, ValueError):
            if not self.cancelled:
                raise
        finally:
            conn.close()
        return reading.done(cancelled=self.cancelled)

    def _post(self, conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        conn.request("POST", "/v1/chat/completions", json.dumps(self.body), headers)
        response = conn.getresponse()
        if response.status != 200:
            text = response.read(500).decode(errors="replace")
            raise OSError(f"HTTP {response.status}: {text}")
        return response

    def cancel(self) -> None:
        """End the answer now (any thread): the connection is shut down under the reader."""
        with self._lock:
            self.cancelled = True
            conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)


class _Reading:
    """The server-sent events of one answer, line by line."""

    def __init__(self, on_text: Callable[[str, int, float | None], object]) -> None:
        self.on_text = on_text
        self.tokens = 0
        self.first = 0.0
        self.finish: str | None = None
        self.speed: float | None = None

    def line(self, line: bytes) -> bool:
        """Take one line; False at the end of the stream."""
        if not line.startswith(b"data:"):
            return True
        data = line.removeprefix(b"data:").strip()
        if data == b"[DONE]":
            return False
        chunk: dict[str, Any] = json.loads(data)
        if timings := chunk.get("timings"):
            self.speed = timings.get("predicted_per_second") or self.speed
        for choice in chunk.get("choices") or ():
            self.finish = choice.get("finish_reason") or self.finish
            if text := (choice.get("delta") or {}).get("content"):
                self.tokens += 1
                now = time.monotonic()
                self.first = self.first or now
                rate = (self.tokens - 1) / (now - self.first) if now > self.first else None
                self.on_text(text, self.tokens, rate)
        return True

    def done(self, *, cancelled: bool) -> Done:
        speed = self.speed
        if speed is None and self.tokens > 1 and self.first:
            speed = (self.tokens - 1) / (time.monotonic() - self.first)
        return Done(self.tokens, speed, None if cancelled else self.finish, cancelled=cancelled)
