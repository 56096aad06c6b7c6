"""Which replica gets a request: least loaded, by prefix, round robin, or by session.

Prefix and session picking use **consistent hashing**: each replica owns
``POINTS`` points on a 64-bit ring, placed by a hash of its URL alone, and a
request goes to the first replica clockwise from the hash of its key. Two
routers with the same replica list therefore agree on the replica for a key
without talking to each other, and adding or losing a replica moves only the
keys that were its own. **Bounded load** (Mirrokni, Thorup and Zadimoghaddam,
2018) keeps a popular prefix from piling onto one replica: a replica already
holding more than ``load_factor`` times the average in-flight count is
skipped for the next one on the ring.

The prefix key is the start of the conversation, not its end: the system
prompt and the messages up to the first user message, each stripped of leading and trailing
blanks, cut at ``prefix_bytes``.
Every later turn of a conversation begins with those bytes, so it returns to
the replica whose prompt cache already holds them.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["POINTS", "Candidate", "Picker", "Ring", "prefix_key", "session_key"]

#: ring points per replica: with 160 the largest share of 2-8 replicas stays within ~10 %
POINTS = 160


class Candidate(Protocol):
    """What picking needs of a replica (``procman.router.replicas.Replica``)."""

    @property
    def url(self) -> str: ...
    @property
    def available(self) -> bool: ...
    @property
    def load(self) -> int: ...
    @property
    def weight(self) -> float:
        """1.0, or less while a readmitted replica ramps up."""
        ...


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Ring:
    """The consistent-hash ring over a fixed list of replica URLs."""

    def __init__(self, urls: Sequence[str], points: int = POINTS) -> None:
        placed = sorted(
            (_hash(f"{url}#{i}".encode()), index)
            for index, url in enumerate(urls)
            for i in range(points)
        )
        self._points = [p for p, _ in placed]
        self._owners = [o for _, o in placed]

    def first(self, key: bytes, replicas: Sequence[Candidate], load_factor: float) -> int | None:
        """The first available replica clockwise from ``key`` whose load is within the bound;
        ``load_factor`` = inf: the first available one (strict affinity)."""
        up = [r for r in replicas if r.available]
        if not up:
            return None
        strict = not math.isfinite(load_factor)
        bound = 0.0 if strict else load_factor * (sum(r.load for r in up) + 1) / len(up)
        start = bisect.bisect(self._points, _hash(key))
        owners = self._owners
        n = len(owners)
        fallback = None
        for step in range(n):
            index = owners[(start + step) % n]
            replica = replicas[index]
            if not replica.available:
                continue
            if fallback is None:
                fallback = index
            if strict or replica.load < max(1, math.ceil(bound * replica.weight)):
                return index
        return fallback


class Picker:
    """One model's picking state (the round-robin position); cheap to call per request."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.ring = Ring(urls)
        self._turn = 0

    def round_robin(self, replicas: Sequence[Candidate]) -> int | None:
        n = len(replicas)
        for step in range(n):
            index = (self._turn + step) % n
            if replicas[index].available:
                self._turn = index + 1
                return index
        return None

    def least_loaded(self, replicas: Sequence[Candidate]) -> int | None:
        """Fewest in flight for its weight; ties go round the replicas in turn."""
        n = len(replicas)
        best, best_score = None, math.inf
        start = self._turn
        for step in range(n):
            index = (start + step) % n
            replica = replicas[index]
            if not replica.available:
                continue
            score = (replica.load + 1) / max(replica.weight, 0.05)
            if score < best_score:
                best, best_score = index, score
        if best is not None:
            self._turn = best + 1
        return best

    def by_key(
        self, key: bytes | None, replicas: Sequence[Candidate], load_factor: float
    ) -> int | None:
        """Consistent hashing of ``key`` (none: least loaded)."""
        if key is None:
            return self.least_loaded(replicas)
        return self.ring.first(key, replicas, load_factor)


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def prefix_key(payload: Any, limit: int) -> bytes | None:
    """The start of a conversation (messages up to the first user message, or the prompt),
    whitespace runs folded, cut at ``limit`` bytes; None when the body has neither."""
    if not isinstance(payload, dict):
        return None
    messages = payload.get("messages")
    parts: list[str] = []
    if isinstance(messages, list):
        size = 0
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = _text(message.get("content"))[:limit].strip().replace("\r\n", "\n")
            text = f"{message.get('role', '')}\x00{content}\x00"
            parts.append(text)
            size += len(text)
            if message.get("role") == "user" or size >= limit:
                break
    else:
        prompt = payload.get("prompt", payload.get("input"))
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt and isinstance(prompt[0], str) else None
        if not isinstance(prompt, str):
            return None
        parts.append(prompt[:limit].lstrip().replace("\r\n", "\n"))
    if not parts:
        return None
    # normalised: clients differ in leading and trailing blanks and in line endings. (Folding
    # every run of whitespace costs ~30 us on 2 KB: more than the rest of the pick.)
    return "".join(parts).encode("utf-8", "surrogatepass")[:limit]


def session_key(headers: Sequence[tuple[str, str]], header: str, payload: Any) -> bytes | None:
    """The session a request names: the ``header`` value, else the body's ``user``."""
    wanted = header.lower()
    for name, value in headers:
        if name.lower() == wanted and value:
            return value.encode("utf-8", "surrogateescape")
    user = payload.get("user") if isinstance(payload, dict) else None
    return user.encode("utf-8", "surrogatepass") if isinstance(user, str) and user else None
