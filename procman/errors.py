"""Errors raised by the process manager.

They extend the tree rooted at :class:`buildtools.errors.LlamactlError`::

    LlamactlError
    ├── ModelError          the model file is missing, not GGUF, truncated...
    ├── ConfigError         a config file or option is invalid (with "did you mean")
    ├── PortInUseError      the port the user asked for is taken
    ├── ServerError         a managed llama-server failed to start or stay up
    │   └── StartupTimeout  it did not become ready in time
    ├── AdmissionError      a server does not fit the memory/VRAM budget
    └── DaemonError         the shared daemon could not be reached or started
"""

from __future__ import annotations

from buildtools.errors import LlamactlError

__all__ = [
    "AdmissionError",
    "ConfigError",
    "DaemonError",
    "LlamactlError",
    "ModelError",
    "PortInUseError",
    "ServerError",
    "StartupTimeout",
]


class ModelError(LlamactlError):
    """The model file cannot be served (missing, unreadable, not GGUF, truncated)."""


class ConfigError(LlamactlError):
    """A configuration value is invalid."""


class PortInUseError(LlamactlError):
    """The requested host:port is already in use."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            f"port {port} on {host} is already in use",
            hint=f"stop whatever listens on {host}:{port}, or pass another --port",
        )
        self.host = host
        self.port = port


class ServerError(LlamactlError):
    """A managed llama-server failed; ``log_tail`` holds its last output."""

    def __init__(self, message: str, *, log_tail: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.log_tail = log_tail


class StartupTimeout(ServerError):
    """The server did not report ready within its startup timeout."""


class AdmissionError(LlamactlError):
    """A server's estimated memory does not fit the budget."""


class DaemonError(LlamactlError):
    """The shared daemon could not be reached or started."""
