"""Stream one chat completion and timestamp every token as it arrives.

llama-server sends one server-sent event per generated token (a token that
ends inside a UTF-8 character comes with the next one), so the arrival of
each event carrying text is the arrival of a token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from procman.bench._cases import BenchCase
from procman.bench._stats import Sample, sample_from_times
from procman.errors import ServerError

if TYPE_CHECKING:
    import aiohttp

__all__ = ["request_body", "stream_case"]


def request_body(case: BenchCase, model: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": case.prompt}]
    if case.system is not None:
        messages.insert(0, {"role": "system", "content": case.system})
    return {
        "model": model,
        "messages": messages,
        "max_tokens": case.max_tokens,
        "temperature": case.temperature,
        "ignore_eos": case.ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
        # a repeated prompt must be processed again, or repetitions 2..N time a cache hit
        "cache_prompt": False,
    }


def _has_text(event: dict[str, Any]) -> bool:
    for choice in event.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content"):
            return True
    return False


async def stream_case(
    session: aiohttp.ClientSession,
    base_url: str,
    case: BenchCase,
    *,
    model: str,
    request_timeout: float = 600.0,
    clock: Callable[[], float] = time.perf_counter,
    headers: Mapping[str, str] | None = None,
) -> Sample:
    """POST ``case`` to ``base_url/v1/chat/completions`` with streaming and time it."""
    import aiohttp  # speed

    arrivals: list[float] = []
    usage: int | None = None
    start = clock()
    try:
        async with session.post(
            f"{base_url}/v1/chat/completions",
            json=request_body(case, model),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=request_timeout),
        ) as resp:
            if resp.status != 200:
                text = (await resp.text())[:500]
                raise ServerError(
                    f"{base_url} answered HTTP {resp.status} to case {case.name!r}: {text}"
                )
            buffer = b""
            async for chunk in resp.content.iter_any():
                now = clock()
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    payload = line.strip().removeprefix(b"data:").strip()
                    if not line.startswith(b"data:") or payload == b"[DONE]":
                        continue
                    event = json.loads(payload)
                    if _has_text(event):
                        arrivals.append(now)
                    if isinstance(event.get("usage"), dict):
                        usage = int(event["usage"].get("completion_tokens", 0)) or None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ServerError(f"case {case.name!r} against {base_url} failed: {exc!r}") from exc
    end = clock()
    return sample_from_times(start, arrivals, end, tokens=usage)
