"""What to run: the resolved, frozen description of one managed llama-server.

Raw input (CLI flags, a config file, a desktop form) is turned into a
:class:`ServerSpec` once; everything downstream (the argv, the log file, the
restart policy, the health checks) reads only the spec. The field docstrings
are the documentation of each setting.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from procman.errors import ConfigError
from procman.process.endpoint import Endpoint, Listen

__all__ = [
    "DeviceSetting",
    "GpuLayers",
    "HealthSettings",
    "LogSettings",
    "RestartSettings",
    "ServerSpec",
    "parse_gpu_layers",
]

GpuLayers = int | Literal["auto", "all"]
DeviceSetting = Literal["auto", "all"] | tuple[int | str, ...]
"""``devices``: ``auto``, ``all``, or NVML indices / UUIDs to pin to."""

_CACHE_RAM = frozenset({"--cache-ram", "-cram"})
_CACHE_RAM_DEFAULT_MIB = 8192  # llama-server's own default for --cache-ram
_PARALLEL = frozenset({"--parallel", "-np"})
#: the slots llama-server gives itself when -np is not given (or is -1: "auto")
SERVER_DEFAULT_SLOTS = 4
_THREADS = frozenset({"--threads", "-t"})
_THREADS_HTTP = frozenset({"--threads-http"})
#: llama-server HTTP threads kept beyond the router's pipeline: health probes, metrics
#: scrapes, daemon clients that call the server directly
SPARE_HTTP_THREADS = 4
#: requests the router keeps at a server per slot (see ServerSpec.pipeline)
PIPELINE_DEPTH = 3
_MIB = 1024 * 1024

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: llama-server options llamactl owns: letting extra args override them would
#: make the supervisor health-check one port while the server listens on another
_RESERVED = frozenset(
    {"--host", "--port", "-m", "--model", "--log-file", "--api-key", "--api-key-file", "--rpc"}
)


def check_extra_args(args: Sequence[str]) -> None:
    """Refuse extra llama-server arguments that would override what llamactl owns."""
    for arg in args:
        if arg.split("=", 1)[0] in _RESERVED:
            raise ConfigError(
                f"extra argument {arg!r} is managed by llamactl",
                hint="llamactl sets the model, host, port and log of the server it supervises",
            )


@dataclass(frozen=True, kw_only=True)
class RestartSettings:
    """When a crashed server is started again, and when llamactl gives up for a while
    (see :mod:`procman.process.policy`)."""

    max_restarts: int = 5
    """Crashes tolerated within ``window`` seconds; one more marks the server failed."""
    window: float = 60.0
    """Seconds a crash is remembered; a server up longer than this starts afresh."""
    backoff_initial: float = 0.25
    """Delay before the first restart, in seconds."""
    backoff_factor: float = 2.0
    """Each further crash in the window multiplies the delay by this."""
    backoff_max: float = 30.0
    """Upper bound of the delay, in seconds."""
    cooldown: float = 60.0
    """Seconds a server that crashed too often stays failed; after that the next request
    (or load) starts it again."""

    def __post_init__(self) -> None:
        if min(self.max_restarts, self.backoff_initial, self.cooldown) < 0 or self.window <= 0:
            raise ConfigError("restart settings must be non-negative (and window positive)")
        if self.backoff_factor < 1 or self.backoff_max < self.backoff_initial:
            raise ConfigError("backoff_factor must be >= 1 and backoff_max >= backoff_initial")


@dataclass(frozen=True, kw_only=True)
class HealthSettings:
    """How ``/health`` is polled. llama-server pushes no readiness signal."""

    loading_interval: float = 0.05
    """Seconds between polls while starting/loading: readiness is noticed within this.

    llama-server's "listening on" log line triggers a poll at once, so the
    usual case does not wait for the interval."""
    ready_interval: float = 2.0
    """Seconds between polls once ready (crashes are noticed at once via the exit, not this)."""
    timeout: float = 5.0
    """A poll that takes longer counts as a failure."""
    unhealthy_after: int = 2
    """Consecutive failed polls after which a ready server is reported unhealthy."""
    restart_after: int = 5
    """Consecutive failed polls after which an unhealthy server is killed and restarted."""


@dataclass(frozen=True, kw_only=True)
class LogSettings:
    """Where a server's stdout+stderr goes and how much of it is kept."""

    directory: Path | None = None
    """Log folder; ``None`` means ``<llamactl home>/logs``."""
    max_bytes: int = 10 * 1024 * 1024
    """Size at which the log is rotated."""
    backups: int = 3
    """Rotated files kept (``name.log.1`` ... ``name.log.N``)."""

    def path_for(self, name: str) -> Path:
        if self.directory is not None:
            return self.directory / f"{name}.log"
        from procman.process.logs import log_path  # speed

        return log_path(name)


@dataclass(frozen=True, kw_only=True)
class ServerSpec:
    """One llama-server: which model, which binary, how to run and supervise it."""

    name: str
    """Identifier: the model name clients send, and the log file's name."""
    model: Path
    """The GGUF file."""
    binary: Path
    """The llama-server executable."""
    aliases: tuple[str, ...] = ()
    """Other names clients may use for this model."""
    ctx: int | None = None
    """Context size (``-c``); ``None`` lets llama-server choose."""
    parallel: int | None = None
    """Slots served concurrently (``-np``); ``None`` lets llama-server choose."""
    gpu_layers: GpuLayers | None = None
    """Layers offloaded to the GPU (``-ngl``): a number, ``auto`` or ``all``."""
    devices: DeviceSetting = "auto"
    """Which GPUs it may use (see :mod:`procman.memory.devices`): ``auto`` (the fewest with
    room, chosen at each start), ``all``, or NVML indices / UUIDs. Only a CUDA build on a
    machine with NVIDIA GPUs is placed."""
    visible_devices: tuple[str, ...] = ()
    """The GPU UUIDs it was placed on (set at admission): the only ones it sees
    (``CUDA_VISIBLE_DEVICES``); empty: the environment's."""
    threads: int | None = None
    """Compute threads (``--threads``); ``None``: a share of the cores when several servers
    may run at once (see :mod:`procman.process.cpu`), else llama-server's default."""
    extra_args: tuple[str, ...] = ()
    """Further llama-server arguments, passed as given."""
    cache_ram: int | None = 0
    """Prompt cache limit in MiB (``--cache-ram``); 0 disables it. It is passed explicitly
    because llama-server's default (8 GiB) grows after start, beyond what admission reserved.
    ``None`` leaves llama-server's default; a ``--cache-ram`` in ``extra_args`` wins."""
    listen: Listen = "unix"
    """How the private server listens: ``unix``, a socket in a folder only this user can
    enter (for servers behind the router), or ``tcp``, a loopback port that needs a random
    per-server key (for clients that call the server themselves: ``server.api_key``)."""
    host: str = "127.0.0.1"
    """With ``listen = "tcp"``: the interface of the private port."""
    port: int | None = None
    """With ``listen = "tcp"``: the private port; ``None`` picks a free one (and another if
    it is taken meanwhile)."""
    rpc: tuple[str, ...] = ()
    """RPC workers (``HOST:PORT`` of each ``ggml-rpc-server``) whose devices hold part of the
    model (``--rpc``). The server and its workers are one group: it is not started while a
    worker is down (state ``waiting_workers``), and it is watched for stalls."""
    tensor_split: tuple[float, ...] = ()
    """Share of the offloaded layers per device (``-ts``), in llama.cpp's device order;
    empty: llama.cpp's own split (by free memory)."""
    stall_timeout: float = 30.0
    """With ``rpc``: seconds a request in flight may make no progress (``/slots``: prompt
    tokens processed, tokens decoded) before the group counts as hung and is restarted. A
    silent worker hangs llama-server's decode while its HTTP answers go on."""
    startup_timeout: float = 120.0
    """Seconds from spawn to ready before the server is killed as hung."""
    stop_grace: float = 10.0
    """Seconds between SIGTERM and SIGKILL when stopping."""
    restart: RestartSettings = field(default_factory=RestartSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    log: LogSettings = field(default_factory=LogSettings)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(
                f"invalid server name {self.name!r}",
                hint="use letters, digits, '.', '_' or '-' (it names the log file)",
            )
        for value, what in ((self.ctx, "ctx"), (self.parallel, "parallel")):
            if value is not None and value < 0:
                raise ConfigError(f"{what} must be >= 0, got {value}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")
        if self.listen not in ("unix", "tcp"):
            raise ConfigError(f"listen must be 'unix' or 'tcp', got {self.listen!r}")
        if self.tensor_split and (
            not (self.rpc or len(self.visible_devices) > 1)
            or min(self.tensor_split) < 0
            or sum(self.tensor_split) <= 0
        ):
            raise ConfigError(
                "tensor_split needs rpc workers and non-negative shares that are not all zero"
            )
        if self.stall_timeout <= 0:
            raise ConfigError("stall_timeout must be positive")
        if self.rpc and "--no-slots" in self.extra_args:
            raise ConfigError(
                "--no-slots cannot be used with rpc workers",
                hint="the stall watchdog reads each slot's progress from /slots",
            )
        if self.startup_timeout <= 0 or self.stop_grace < 0:
            raise ConfigError("startup_timeout must be positive and stop_grace non-negative")
        check_extra_args(self.extra_args)

    @property
    def log_path(self) -> Path:
        return self.log.path_for(self.name)

    def _given(self, flags: frozenset[str], default: int | None) -> int | None:
        """The number an option takes in the extra args (the last one wins, as in llama-server)."""
        number = default
        args = list(self.extra_args)
        for i, arg in enumerate(args):
            flag, eq, value = arg.partition("=")
            if flag in flags:
                text = value if eq else (args[i + 1] if i + 1 < len(args) else "")
                number = int(text) if text.lstrip("-").isdigit() else number
        return number

    @property
    def cache_ram_bytes(self) -> int:
        """The prompt cache's limit in bytes, as the memory estimate takes it."""
        mib = self._given(_CACHE_RAM, self.cache_ram)
        if mib is None or mib < 0:  # llama-server's default, or -1 = no limit: count the default
            return _CACHE_RAM_DEFAULT_MIB * _MIB
        return mib * _MIB

    @property
    def slots(self) -> int:
        """Requests llama-server decodes at once: ``-np`` from ``parallel`` or the extra args."""
        slots = self._given(_PARALLEL, self.parallel)
        return slots if slots is not None and slots > 0 else SERVER_DEFAULT_SLOTS

    @property
    def threads_given(self) -> int | None:
        """Compute threads the user chose: ``-t``/``--threads`` in the extra args, else
        :attr:`threads`; ``None``: nobody chose."""
        return self._given(_THREADS, self.threads)

    @property
    def http_threads(self) -> int:
        """llama-server's fixed HTTP threads: ``--threads-http`` from the extra args, or what
        llamactl passes, enough for the router's :attr:`pipeline` and the spare ones."""
        given = self._given(_THREADS_HTTP, None)
        if given is None:
            return PIPELINE_DEPTH * self.slots + SPARE_HTTP_THREADS  # what argv passes
        # 0 or less: llama-server's own choice, max(slots + 4, cores - 1); at least the former
        return given if given > 0 else self.slots + 4

    @property
    def pipeline(self) -> int:
        """Requests the router keeps at this server at once when its model has no queue.

        :data:`PIPELINE_DEPTH` times the slots: when a batch finishes, enough
        requests wait in llama-server to fill the freed slots for its next
        steps, instead of waiting for the router's round trip. With slots + 2,
        16 concurrent one-token clients measured +18 ms p50 over direct on 2
        cores. Twice the slots was enough there (-3 to +4 ms) but not on an
        H200, where a batch of one-token answers takes ~2.6 ms: 16 clients got
        0.83x direct's throughput through the router (+2.1 ms p50), three
        times the slots 1.00x (+0.1 ms), in one lease (bench/REPORT-h200.md);
        on 2 cores the two measured the same.

        Never more than the fixed HTTP threads less the spare ones: every
        connection the router keeps open pins one of llama-server's threads
        between requests, and cpp-httplib does not start another while one is
        counted idle (a burst then waits for the keep-alive timeout, 5 s: seen
        with 16 in flight on 8 threads).
        """
        return max(1, min(PIPELINE_DEPTH * self.slots, self.http_threads - SPARE_HTTP_THREADS))

    def env(self) -> dict[str, str] | None:
        """The environment for the spawn: ours, with only its GPUs visible (by UUID, so
        CUDA's own device order cannot renumber them); None: ours as it is."""
        if not self.visible_devices:
            return None
        import os  # speed

        return {
            **os.environ,
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": ",".join(self.visible_devices),
        }

    def argv(self, endpoint: Endpoint) -> list[str]:
        """The llama-server command line for a server listening at ``endpoint``."""
        argv = [str(self.binary), "-m", str(self.model), *endpoint.argv()]
        argv += ["--alias", ",".join((self.name, *self.aliases))]
        if self.ctx is not None:
            argv += ["-c", str(self.ctx)]
        if self.parallel is not None:
            argv += ["-np", str(self.parallel)]
        if self.gpu_layers is not None:
            argv += ["-ngl", str(self.gpu_layers)]
        if self.threads is not None and self._given(_THREADS, None) is None:
            argv += ["--threads", str(self.threads)]
        if self.rpc:
            argv += ["--rpc", ",".join(self.rpc)]
        if self.tensor_split:
            argv += ["-ts", ",".join(f"{share:g}" for share in self.tensor_split)]
        if len(self.visible_devices) > 1:
            argv += ["--split-mode", "layer"]
        given = any(arg.partition("=")[0] in _CACHE_RAM for arg in self.extra_args)
        if self.cache_ram is not None and not given:
            argv += ["--cache-ram", str(self.cache_ram)]
        if self._given(_THREADS_HTTP, None) is None:
            argv += ["--threads-http", str(self.http_threads)]
        # colours would put escape codes into the log file
        argv += ["--log-colors", "off", *self.extra_args]
        return argv


def parse_gpu_layers(text: str | None) -> GpuLayers | None:
    """``"auto"``/``"all"``/``"N"`` from the command line, parsed once."""
    if text is None:
        return None
    match text.strip().lower():
        case "auto":
            return "auto"
        case "all":
            return "all"
        case digits if digits.isdigit():
            return int(digits)
        case _:
            raise ConfigError(f"--gpu-layers must be a number, 'auto' or 'all', got {text!r}")
