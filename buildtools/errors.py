"""The one exception tree of llamactl.

Every error the library raises on purpose derives from :class:`LlamactlError`
and says what to do next. Third-party exceptions are translated at the seam
(``raise ... from exc``) so callers catch one root::

    LlamactlError
    ├── SourceError            llama.cpp tree missing, hash mismatch, not a llama.cpp tree
    ├── DownloadError          the package index could not provide an artefact
    ├── PlanError              a backend was asked for that this machine cannot build
    ├── BuildError             cmake/ninja failed (carries command, exit code, log tail)
    │   ├── ToolchainError     compiler/cmake/ninja missing or too old
    │   └── BuildCancelled     stopped on request (a CancelToken); finished objects are kept
    ├── VerificationError      the built server did not run correctly here
    ├── CacheError             cache entry unknown or unusable
    └── procman.errors.*       ModelError, ConfigError, PortInUseError, ServerError, ...

The CLI maps these to messages and exit codes; the library never exits.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BuildCancelled",
    "BuildError",
    "CacheError",
    "DownloadError",
    "LlamactlError",
    "PlanError",
    "SourceError",
    "ToolchainError",
    "VerificationError",
]


class LlamactlError(Exception):
    """Root of every error llamactl raises on purpose.

    ``hint`` says what the user can do about it; the CLI prints it after the
    message.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class SourceError(LlamactlError):
    """The llama.cpp source tree could not be found, fetched or trusted."""


class DownloadError(LlamactlError):
    """An artefact could not be fetched from the package index."""


class PlanError(LlamactlError):
    """The requested build cannot be planned on this machine."""


class BuildError(LlamactlError):
    """A step of the build failed.

    Carries the failing ``command``, its ``returncode``, the ``log_tail`` and
    where the full log is (``log_path``).
    """

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] = (),
        returncode: int | None = None,
        log_tail: str = "",
        log_path: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.command = list(command)
        self.returncode = returncode
        self.log_tail = log_tail
        self.log_path = log_path


class ToolchainError(BuildError):
    """A required tool (C/C++ compiler, cmake, ninja) is missing or too old."""


class BuildCancelled(BuildError):
    """The build was stopped on request (:class:`buildtools.cancel.CancelToken`).

    The build tree is kept: the next build of the same plan resumes it.
    """


class VerificationError(LlamactlError):
    """A freshly built server did not pass its real run on this machine."""

    def __init__(
        self,
        message: str,
        *,
        returncode: int | None = None,
        log_tail: str = "",
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.returncode = returncode
        self.log_tail = log_tail


class CacheError(LlamactlError):
    """A cached build was asked for that does not exist or is unusable."""
