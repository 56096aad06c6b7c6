"""Helpers shared by the suite's sections: statistics, processes, HTTP probes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from procman.bench import percentile  # noqa: E402
from procman.process.endpoint import Endpoint  # noqa: E402
from procman.spec import ServerSpec  # noqa: E402

RESULTS = ROOT / "bench" / "results"
REPORT = ROOT / "bench" / "REPORT.md"
HOST = "127.0.0.1"
#: the `llamactl` console script users run (pip puts it beside the interpreter), else the module
_SCRIPT = Path(sys.executable).with_name("llamactl")
LLAMACTL = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "procman.cli"]

Section = dict[str, Any]


class NotReadyError(RuntimeError):
    """HTTP 503: the model is still loading (llamactl's router says so with Retry-After)."""


# -- small helpers --------------------------------------------------------------------------------
def spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "median": percentile(values, 50),
        "p10": percentile(values, 10),
        "p90": percentile(values, 90),
        "n": len(values),
    }


def fmt(st: dict[str, float] | None, unit: str = "", digits: int = 1) -> str:
    if st is None:
        return "not measured"
    d = digits
    return f"{st['median']:.{d}f}{unit} [{st['p10']:.{d}f}-{st['p90']:.{d}f}] (n={st['n']:.0f})"


def ratios(a: Sequence[float], b: Sequence[float]) -> dict[str, float] | None:
    """b/a per interleaved round."""
    return spread([y / x for x, y in zip(a, b, strict=False) if x > 0])


def diffs(a: Sequence[float], b: Sequence[float]) -> dict[str, float] | None:
    return spread([y - x for x, y in zip(a, b, strict=False)])


def cmdline(argv: Sequence[str | Path]) -> str:
    text = shlex.join(str(a) for a in argv)
    for launcher in (shlex.join(LLAMACTL), sys.executable + " -m procman.cli"):
        text = text.replace(launcher, "llamactl")
    return text.replace(str(Path.home()), "~")


def stop(proc: subprocess.Popen[bytes], *, grace: float = 10.0) -> None:
    """SIGTERM the process (llamactl stops its servers), then SIGKILL its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@contextlib.contextmanager
def launched(
    argv: Sequence[str | Path], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=None if env is None else {**os.environ, **env},
        )
    try:
        yield proc
    finally:
        stop(proc)


def _same_server() -> tuple[str, ...]:
    # taken from ServerSpec.argv for a model served with llamactl's defaults
    spec = ServerSpec(name="m", model=Path("m.gguf"), binary=Path("s"))
    argv = spec.argv(Endpoint(socket="m.sock"))
    flags = ("--cache-ram", "--threads-http")
    return tuple(x for i, a in enumerate(argv) if a in flags for x in argv[i : i + 2])


#: llama-server arguments llamactl passes to every server it runs (see ServerSpec.argv)
#: that change its behaviour: given to the direct and llama.cpp-router servers too
SAME_SERVER = _same_server()


def server_argv(binary: Path, model: Path, port: int, *extra: str) -> list[str]:
    return [
        str(binary),
        "-m",
        str(model),
        "--host",
        HOST,
        "--port",
        str(port),
        "--log-colors",
        "off",
        *extra,
    ]


async def wait_until(
    probe: Callable[[], Awaitable[bool]], proc: subprocess.Popen[bytes], limit: float = 120.0
) -> float:
    """Poll ``probe`` every 10 ms until it is true; returns the monotonic time it was."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, NotReadyError):
            if await probe():
                return time.monotonic()
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{proc.args!r} not ready in {limit} s")


def _session() -> aiohttp.ClientSession:
    # fresh connections: llama-server may close keep-alive connections after
    # streamed answers, and every target pays the same loopback connect
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=64))


async def healthy(session: aiohttp.ClientSession, base: str) -> bool:
    async with session.get(f"{base}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
        await r.read()
        return r.status == 200


async def one_token(
    session: aiohttp.ClientSession, base: str, model: str, path: str = "/v1/chat/completions"
) -> float:
    """Seconds for a non-streamed one-token answer: a chat completion, or at ``path``
    ``/v1/messages`` (the same body is a valid Anthropic Messages request)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    t0 = time.perf_counter()
    async with session.post(
        f"{base}{path}", json=body, timeout=aiohttp.ClientTimeout(total=120)
    ) as r:
        await r.read()
        if r.status == 503:
            raise NotReadyError(f"{base} answered HTTP 503")
        if r.status != 200:
            raise RuntimeError(f"{base} answered HTTP {r.status}")
    return time.perf_counter() - t0


async def answered(session: aiohttp.ClientSession, base: str, model: str) -> bool:
    await one_token(session, base, model)
    return True
