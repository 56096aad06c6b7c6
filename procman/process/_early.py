"""Start llama-server at launch when the same ``llamactl serve`` command got one ready before.

``llamactl serve`` checks everything before it spawns: it imports its CLI,
the supervisor and the budget, validates the model, resolves the binary and
admits the server (~250 ms of Python on a 2-core machine), and only then
starts llama-server, which itself needs ~0.5 s to load the demo model. One
after the other, that is ~250 ms more than starting llama-server by hand.

So the entry point, before importing anything heavy (this module uses the
standard library only), looks up what the same command spawned the last time
it got a server ready, and starts that again at once on a fresh private
socket. The CLI then runs exactly as without it (validation, binary,
admission, command line) and :class:`~procman.process.server.ManagedServer` adopts
the early process only if the command line it would run is the one already
running; otherwise, or if the CLI stops for any reason first, the early
process is killed (:func:`discard`, also at exit; SIGKILL of llamactl kills
it through PR_SET_PDEATHSIG).

An early start happens only when nothing it relies on has changed:

* the model is the same file (device, inode, size, mtime and ctime in ns)
  that gguf validation recorded as good (``model-info.json``); a file that is
  missing, replaced, rewritten, truncated or made unreadable never starts
  early, so it is still reported before anything is spawned;
* the llama-server binary is the same file;
* the public port can be bound now (a busy port is the CLI's to report);
* MemAvailable covers the recorded memory need plus the budget's margin;
* the binary is not a CUDA build: ``-ngl auto`` and the VRAM budget read the
  free VRAM, which an early process would already be taking;
* Linux (PR_SET_PDEATHSIG, pidfd) and ``LLAMACTL_EARLY_START`` is not ``0``.

Records: ``<home>/launches/<sha256 of the command>.rec`` (the command is its
arguments, working directory and ``LLAMACTL_*`` variables), written once a
server is ready (see :class:`Record`).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import time

from procman.process._pdeathsig import child_setup
from procman.process._sockets import can_bind, home, new_socket_path

__all__ = ["EarlyServer", "Record", "discard", "launched_at", "remember", "start", "take"]

#: bump when a record's fields change meaning: old records are then ignored
FORMAT = 2
#: records kept; the least recently written go first
MAX_RECORDS = 32
#: the pipe holds llama-server's output until the CLI adopts it (~15 KiB for the demo model)
_PIPE_BYTES = 1 << 20


class EarlyServer:
    """A llama-server started at launch, waiting to be adopted or discarded.

    (A plain class: dataclasses imports inspect, ~10 ms at launch.)
    """

    def __init__(
        self, process: subprocess.Popen[bytes], argv: list[str], socket: str, pidfd: int
    ) -> None:
        self.process = process
        self.argv = argv
        #: the private Unix socket it listens on (see procman.process.endpoint)
        self.socket = socket
        #: a pidfd for the process (readable once it exits): no pid-reuse race, no thread
        self.pidfd = pidfd
        #: time.monotonic() of the spawn
        self.started = time.monotonic()
        self.adopted = False

    def discard(self) -> None:
        """Kill the process group and reap it, unless adopted; idempotent."""
        if self.adopted or self.pidfd < 0:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        if self.process.stdout is not None:
            with contextlib.suppress(OSError):  # a half-done adoption's pipe transport closed it
                self.process.stdout.close()
        os.close(self.pidfd)
        self.pidfd = -1
        with contextlib.suppress(OSError):
            os.unlink(self.socket)


class _Launch:
    #: ``serve``'s arguments when this process was launched as ``llamactl serve``
    args: list[str] | None = None
    #: time.monotonic() when the entry point called :func:`start`
    at: float | None = None
    early: EarlyServer | None = None


_launch = _Launch()


def start(args: list[str]) -> None:
    """Called by the entry point with ``serve``'s arguments; never raises."""
    _launch.at = time.monotonic()
    _launch.args = list(args)
    try:
        _launch.early = _start(args)
    except Exception:  # never fatal: the CLI then spawns as it always does
        _launch.early = None
    if _launch.early is not None:
        atexit.register(discard)


def launched_at() -> float | None:
    """time.monotonic() of the launch, if this process was launched as ``llamactl serve``."""
    return _launch.at


def take() -> EarlyServer | None:
    """The early server, if one was started (it stays ours to discard until adopted)."""
    return _launch.early


def discard() -> None:
    """Kill the early server unless it was adopted."""
    if _launch.early is not None:
        _launch.early.discard()


def record_path(args: list[str]) -> str:
    """Where the record for ``serve ARGS`` (here, with this environment) lives."""
    settings = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("LLAMACTL_"))
    material = "\0".join([f"serve-{FORMAT}", os.getcwd(), *args, "\0", *settings])
    digest = hashlib.sha256(material.encode("utf-8", "surrogateescape")).hexdigest()
    return os.path.join(home(), "launches", f"{digest[:32]}.rec")


def identity(st: os.stat_result) -> list[int]:
    """What identifies a file's bytes without reading them (see procman.models._info_cache)."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class Record:
    """What one ``serve`` ran, as the next identical launch needs it.

    Stored as NUL-separated text (the magic, the fields below, then argv):
    trivially safe to parse, and no ``json``/``re`` import (~5 ms) before the
    spawn.
    """

    MAGIC = f"llamactl-launch-{FORMAT}"

    def __init__(
        self,
        *,
        argv: list[str],
        socket_index: int,
        model: str,
        model_identity: list[int],
        binary: str,
        binary_identity: list[int],
        public: tuple[str, int],
        min_available: int,
        cuda: bool,
    ) -> None:
        self.argv = argv
        self.socket_index = socket_index
        self.model = model
        self.model_identity = model_identity
        self.binary = binary
        self.binary_identity = binary_identity
        self.public = public
        self.min_available = min_available
        self.cuda = cuda

    def encode(self) -> bytes:
        fields = [
            self.MAGIC,
            self.model,
            " ".join(map(str, self.model_identity)),
            self.binary,
            " ".join(map(str, self.binary_identity)),
            str(self.socket_index),
            self.public[0],
            str(self.public[1]),
            str(self.min_available),
            "1" if self.cuda else "0",
            *self.argv,
        ]
        return "\0".join(fields).encode("utf-8", "surrogateescape")

    @classmethod
    def decode(cls, data: bytes) -> Record:
        """Raises ValueError for anything but a record this version wrote."""
        fields = data.decode("utf-8", "surrogateescape").split("\0")
        if len(fields) < 11 or fields[0] != cls.MAGIC:
            raise ValueError("not a launch record of this version")
        (_, model, model_id, binary, binary_id, index, public_host, public_port,
         min_available, cuda, *argv) = fields  # fmt: skip
        record = cls(
            argv=argv,
            socket_index=int(index),
            model=model,
            model_identity=[int(n) for n in model_id.split()],
            binary=binary,
            binary_identity=[int(n) for n in binary_id.split()],
            public=(public_host, int(public_port)),
            min_available=int(min_available),
            cuda=cuda == "1",
        )
        if not 0 <= record.socket_index < len(argv):
            raise ValueError("socket index out of range")
        return record


def _load(args: list[str]) -> Record | None:
    """The record for this command, if one exists and everything it names is unchanged."""
    try:
        with open(record_path(args), "rb") as f:
            record = Record.decode(f.read())
        if record.cuda:
            return None
        if identity(os.stat(record.model)) != record.model_identity:
            return None
        if identity(os.stat(record.binary)) != record.binary_identity:
            return None
    except (OSError, ValueError):
        return None
    usable = (
        os.access(record.model, os.R_OK)
        and os.access(record.binary, os.X_OK)
        and (_mem_available() or 0) >= record.min_available
        and can_bind(*record.public)
    )
    return record if usable else None


def _start(args: list[str]) -> EarlyServer | None:
    if not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"):
        return None
    if os.environ.get("LLAMACTL_EARLY_START", "1") == "0" or (record := _load(args)) is None:
        return None
    socket = new_socket_path(os.path.basename(record.model).removesuffix(".gguf"))
    argv = list(record.argv)
    argv[record.socket_index] = socket
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=child_setup(),  # noqa: PLW1509 - only prctl + getppid run before exec
    )
    try:
        pidfd = os.pidfd_open(process.pid)
    except OSError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None
    if process.stdout is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(process.stdout, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    return EarlyServer(process, argv, socket, pidfd)


def remember(
    *,
    argv: list[str],
    socket: str,
    model: str,
    binary: str,
    public: tuple[str, int],
    min_available: int,
    cuda: bool,
) -> None:
    """Record what this ``serve`` ran, once it was ready, for the next identical launch.

    Nothing is recorded unless this process was launched as ``llamactl serve``
    (:func:`start` ran) and the model's current identity is one gguf
    validation recorded as good. Never raises: the record is an optimisation.
    """
    if _launch.args is None:
        return
    from pathlib import Path  # speed

    from buildtools.paths import write_atomic  # speed
    from procman.models import _info_cache  # speed

    try:
        st = os.stat(model)
        if _info_cache.lookup(_info_cache.file_key(Path(model).resolve(), st)) is None:
            return
        record = Record(
            argv=argv,
            socket_index=argv.index(socket, argv.index("--host")),
            model=model,
            model_identity=identity(st),
            binary=binary,
            binary_identity=identity(os.stat(binary)),
            public=public,
            min_available=min_available,
            cuda=cuda,
        )
        path = Path(record_path(_launch.args))
        write_atomic(path, record.encode())  # mode 0600: argv may hold llama-server's --api-key
        records = sorted(path.parent.glob("*.rec"), key=lambda p: p.stat().st_mtime)
        for old in records[:-MAX_RECORDS]:
            old.unlink(missing_ok=True)
    except (OSError, ValueError):
        return
