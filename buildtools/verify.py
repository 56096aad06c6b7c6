"""Prove that a build runs here: start it, get a real chat completion, stop it.

A binary that compiles is not a binary that runs: a CPU may advertise an
instruction set the kernel does not enable, or a GPU build may silently fall
back to the CPU. So every build is started on the demo model before it is
published, and what it did is recorded in the build's manifest.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from buildtools._ports import pick_free_port
from buildtools._runner import capture, describe_exit
from buildtools.errors import VerificationError

__all__ = [
    "RpcVerifyResult",
    "VerifyResult",
    "gpu_offload",
    "log_tail",
    "read_version",
    "rpc_version",
    "verify_rpc",
    "verify_server",
]

_VERSION = re.compile(
    r"version:\s*(?P<semver>\S+)\s*\(build (?P<build>\d+), commit (?P<commit>\w+)\)"
)
_TAIL_LINES = 25
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_RPC_STARTED = re.compile(r"Starting RPC server v(\d+\.\d+\.\d+)")
_RPC_BUFFER = re.compile(r"(RPC\d+\[[^\]]+\]) model buffer size")


@dataclass(frozen=True, kw_only=True)
class VerifyResult:
    ok: bool
    seconds_to_ready: float
    completion_tokens: int
    text: str
    exit_code: int | None
    gpu_layers: str | None = None
    """``offloaded/total`` as llama-server logged it, for a GPU build."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_version(binary: Path) -> dict[str, str]:
    """``llama-server --version`` parsed into build number and commit."""
    done = capture([str(binary), "--version"], timeout=30)
    match = _VERSION.search(done.stdout + done.stderr)
    if not match:
        return {
            "build": "unknown",
            "commit": "unknown",
            "raw": (done.stdout + done.stderr).strip()[:200],
        }
    return match.groupdict()


def gpu_offload(log: str) -> tuple[int, int] | None:
    """The layers llama-server says it offloaded to the GPU, and of how many."""
    found = _OFFLOADED.findall(log)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def log_tail(path: Path, lines: int = _TAIL_LINES) -> str:
    """The last ``lines`` lines of a log, or "" if it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _get(url: str, timeout: float) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URL we built
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _chat(base: str, timeout: float) -> dict[str, Any]:
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "Say hello in three words."}],
            "max_tokens": 8,
            "temperature": 0,
        }
    ).encode()
    req = urllib.request.Request(  # noqa: S310 - loopback URL we built
        f"{base}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
        result: dict[str, Any] = json.loads(resp.read())
        return result


def verify_server(
    binary: Path,
    model: Path,
    *,
    log_path: Path,
    timeout: float = 120.0,
    extra_args: Sequence[str] = (),
    gpu: str | None = None,
) -> VerifyResult:
    """Run ``binary`` on ``model`` until it answers one chat completion.

    ``gpu`` names the GPU backend of the build (e.g. ``CUDA``): every layer is
    then offloaded (``-ngl all``; the demo model needs well under 1 GiB of
    VRAM), and a run that put none on the GPU fails the verification rather
    than publishing a GPU build that silently used the CPU.

    Raises :class:`VerificationError` with the exit status (a signal name for
    SIGILL and friends) and the tail of the server log when anything fails.
    """
    port = pick_free_port()
    argv = [
        str(binary),
        "-m",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        "512",
        "-np",
        "1",
        # -lv 4: llama-server's default verbosity hides the offload line
        *(("-ngl", "all", "-lv", "4") if gpu else ()),
        *extra_args,
    ]
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        ready_at = None
        while ready_at is None:
            if (code := proc.poll()) is not None:
                raise VerificationError(
                    f"the built server died while loading the demo model: {describe_exit(code)}",
                    returncode=code,
                    log_tail=log_tail(log_path),
                )
            if time.monotonic() - started > timeout:
                raise VerificationError(
                    f"the built server was not ready after {timeout:.0f} s",
                    log_tail=log_tail(log_path),
                )
            try:
                if _get(f"{base}/health", timeout=2) == 200:
                    ready_at = time.monotonic()
                    break
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.05)  # llama-server has no readiness push; poll briefly
        try:
            answer = _chat(base, timeout=timeout)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            code = proc.poll()
            raise VerificationError(
                f"the built server failed a chat completion: "
                f"{describe_exit(code) if code is not None else exc}",
                returncode=code,
                log_tail=log_tail(log_path),
            ) from exc
        tokens = int(answer.get("usage", {}).get("completion_tokens", 0))
        text = str(answer.get("choices", [{}])[0].get("message", {}).get("content", ""))
        if tokens <= 0:
            raise VerificationError(
                "the built server answered with no tokens", log_tail=log_tail(log_path)
            )
        offload = gpu_offload(log_path.read_text(errors="replace")) if gpu else None
        if gpu and (offload is None or offload[0] == 0):
            raise VerificationError(
                f"the {gpu} build answered but put no layer on the GPU",
                log_tail=log_tail(log_path),
            )
        proc.send_signal(signal.SIGTERM)
        try:
            exit_code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired as exc:
            raise VerificationError(
                "the built server did not exit within 30 s of SIGTERM", log_tail=log_tail(log_path)
            ) from exc
        if exit_code != 0:
            raise VerificationError(
                f"the built server did not exit cleanly: {describe_exit(exit_code)}",
                returncode=exit_code,
                log_tail=log_tail(log_path),
            )
        return VerifyResult(
            ok=True,
            seconds_to_ready=round(ready_at - started, 3),
            completion_tokens=tokens,
            text=text,
            exit_code=exit_code,
            gpu_layers=f"{offload[0]}/{offload[1]}" if offload else None,
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@dataclass(frozen=True, kw_only=True)
class RpcVerifyResult:
    ok: bool
    protocol: str
    """The RPC protocol version the worker announced (``7.0.0`` at b11312)."""
    buffers: tuple[str, ...]
    """The RPC devices llama-server put model weights on, as it logged them."""
    completion_tokens: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def rpc_version(log: str) -> str | None:
    """The protocol version in a worker's ``Starting RPC server vX.Y.Z`` line."""
    found = _RPC_STARTED.search(log)
    return found.group(1) if found else None


def _wait_accepting(port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Poll until 127.0.0.1:``port`` accepts; False if ``proc`` exits first.

    ggml-rpc-server exits 0 after a failed bind or a bad argument, so the
    exit status says nothing: the listening port is the only readiness signal.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def verify_rpc(
    worker: Path, server: Path, model: Path, *, log_dir: Path, timeout: float = 120.0
) -> RpcVerifyResult:
    """One answer through RPC on loopback: a ggml-rpc-server, then
    ``llama-server --rpc`` with every layer on it.

    The worker is probed by connecting to its port; its one accept slot is
    then free again for llama-server, which serves one leader at a time.
    """
    port = pick_free_port()
    worker_log = log_dir / "verify-rpc-worker.log"
    with worker_log.open("wb") as log:
        proc = subprocess.Popen(
            [str(worker), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        if not _wait_accepting(port, proc, timeout=30):
            raise VerificationError(
                "the built ggml-rpc-server did not start listening",
                returncode=proc.poll(),
                log_tail=log_tail(worker_log),
            )
        server_log = log_dir / "verify-rpc.log"
        result = verify_server(
            server,
            model,
            log_path=server_log,
            timeout=timeout,
            extra_args=("--rpc", f"127.0.0.1:{port}", "-ngl", "all", "-lv", "4"),
        )
        # the worker's stdout is a file, so block-buffered: its banner reaches the log with
        # the fflush after "Accepted client connection", by now long past
        protocol = rpc_version(worker_log.read_text(errors="replace")) or "unknown"
        buffers = tuple(dict.fromkeys(_RPC_BUFFER.findall(server_log.read_text(errors="replace"))))
        if not buffers:
            raise VerificationError(
                "llama-server answered through --rpc but put no weights on the RPC worker",
                log_tail=log_tail(server_log),
            )
        return RpcVerifyResult(
            ok=True,
            protocol=protocol,
            buffers=buffers,
            completion_tokens=result.completion_tokens,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
