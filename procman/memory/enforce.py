"""Memory limits: a policy fed by samples, and cgroup v2 where the kernel can enforce them.

:class:`MemoryLimit` is pure, like :class:`~procman.process.policy.RestartPolicy`:
the caller passes each sample's time and bytes, it returns a decision or
None. One sample over the limit is not enough, because llama-server's RSS
spikes briefly while a long prompt's compute buffers are first touched and
while a restart reloads the model; the server must stay over the limit for
``samples`` consecutive readings spanning at least ``seconds``.

A polling limit acts after the fact. The kernel can do better: a cgroup v2
``memory.max`` makes allocations beyond the limit reclaim or OOM-kill
inside the group only, not a random process on the machine.
:func:`detect_cgroup_v2` says whether that is possible here and why not;
:func:`limit_in_cgroup` applies it to a pid.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from procman._units import format_bytes
from procman.errors import ConfigError

__all__ = [
    "CgroupSupport",
    "LimitAction",
    "LimitDecision",
    "LimitSettings",
    "MemoryLimit",
    "detect_cgroup_v2",
    "limit_in_cgroup",
    "remove_cgroup",
]


class LimitAction(StrEnum):
    RESTART = "restart"
    STOP = "stop"


@dataclass(frozen=True, kw_only=True)
class LimitSettings:
    """What a per-model ``memory_limit`` means in practice."""

    memory_limit: int | None = None
    """Bytes of RSS the server may hold (the mapped model counts in full, as it does for
    the OOM killer; PSS is too costly to read at every sample); None = no limit."""
    samples: int = 3
    """Consecutive samples over the limit before acting."""
    seconds: float = 5.0
    """...which must also span at least this many seconds."""
    action: LimitAction = LimitAction.RESTART
    """Restart the server (a leak) or stop it (a limit it can never meet)."""

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seconds < 0:
            raise ConfigError("limit samples must be >= 1 and seconds >= 0")
        if self.memory_limit is not None and self.memory_limit <= 0:
            raise ConfigError("memory_limit must be positive")


@dataclass(frozen=True, kw_only=True)
class LimitDecision:
    action: LimitAction
    #: for the event: "rss 212 MiB > limit 150 MiB for 6 s"
    reason: str
    used_bytes: int
    limit_bytes: int
    seconds_over: float


class MemoryLimit:
    """One server's limit; feed it every sample with :meth:`observe`."""

    def __init__(self, settings: LimitSettings) -> None:
        self.settings = settings
        self._over_since: float | None = None
        self._count = 0

    def observe(self, now: float, used_bytes: int, *, metric: str = "rss") -> LimitDecision | None:
        """A reading of ``metric`` at monotonic ``now``; a decision once the excess is sustained.

        After a decision the count starts over, so the restart it causes is
        not answered by another decision on the next sample.
        """
        limit = self.settings.memory_limit
        if limit is None or used_bytes <= limit:
            self.reset()
            return None
        if self._over_since is None:
            self._over_since = now
        self._count += 1
        span = now - self._over_since
        if self._count < self.settings.samples or span < self.settings.seconds:
            return None
        self.reset()
        return LimitDecision(
            action=self.settings.action,
            reason=(
                f"{metric} {format_bytes(used_bytes)} > limit {format_bytes(limit)} "
                f"for {span:.0f} s ({self._plural(self.settings.samples)})"
            ),
            used_bytes=used_bytes,
            limit_bytes=limit,
            seconds_over=span,
        )

    @staticmethod
    def _plural(n: int) -> str:
        return f"{n} sample" if n == 1 else f"{n} samples"

    def reset(self) -> None:
        self._over_since, self._count = None, 0


# -- cgroup v2 ----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class CgroupSupport:
    available: bool
    reason: str
    #: the cgroup under which per-server groups are created, when available
    base: Path | None = None


def detect_cgroup_v2(root: Path = Path("/")) -> CgroupSupport:  # noqa: PLR0911 - one return per reason
    """Can llamactl put a server in a cgroup v2 group with ``memory.max``? Never raises.

    ``root`` is the filesystem root (a fake tree in tests). It needs: a
    cgroup2 mount, llamactl's own group there (``/proc/self/cgroup``'s
    ``0::`` line), the memory controller in that group, write permission
    (a delegated subtree), and ``memory`` in its ``cgroup.subtree_control``.
    The last cannot be switched on by us while llamactl itself is in the
    group, except at the root of a namespace: cgroup v2's "no internal
    processes" rule.
    """
    try:
        mounts = (root / "proc/self/mountinfo").read_text()
        own = (root / "proc/self/cgroup").read_text()
    except OSError as exc:
        return CgroupSupport(available=False, reason=f"cannot read /proc: {exc.strerror}")
    mount = next(
        (fields[4] for line in mounts.splitlines() if " - cgroup2 " in line
         for fields in [line.split()]),
        None,
    )  # fmt: skip
    if mount is None:
        return CgroupSupport(available=False, reason="no cgroup2 mount: this system uses cgroup v1")
    rel = next((ln[3:] for ln in own.splitlines() if ln.startswith("0::")), None)
    if rel is None:
        return CgroupSupport(available=False, reason="llamactl's process is in no cgroup v2 group")
    group = root / mount.lstrip("/") / rel.lstrip("/")
    shown = Path(mount) / rel.lstrip("/")
    try:
        controllers = (group / "cgroup.controllers").read_text().split()
        subtree = (group / "cgroup.subtree_control").read_text().split()
    except OSError as exc:
        return CgroupSupport(available=False, reason=f"cannot read {shown}: {exc.strerror}")
    if "memory" not in controllers:
        hybrid = " (hybrid hierarchy: memory is on cgroup v1)" if mount != "/sys/fs/cgroup" else ""
        return CgroupSupport(
            available=False,
            reason=f"the memory controller is not delegated to {shown}{hybrid}",
        )
    if not os.access(group, os.W_OK):
        return CgroupSupport(
            available=False,
            reason=f"{shown} is not writable by this user: no delegated subtree "
            "(run under `systemd-run --user --scope -p Delegate=yes`)",
        )
    if "memory" not in subtree and rel.strip("/"):
        return CgroupSupport(
            available=False,
            reason=f"memory is not enabled in {shown}/cgroup.subtree_control, and cannot be "
            "while llamactl's own process is in that group (cgroup v2 no-internal-processes rule)",
        )
    return CgroupSupport(available=True, reason=f"cgroup v2 memory.max under {shown}", base=group)


def limit_in_cgroup(support: CgroupSupport, name: str, pid: int, memory_max: int) -> Path:
    """Create ``<base>/llamactl-<name>`` with ``memory.max`` and move ``pid`` into it."""
    if not support.available or support.base is None:
        raise ConfigError(f"cannot limit memory with cgroups here: {support.reason}")
    try:
        if "memory" not in (support.base / "cgroup.subtree_control").read_text().split():
            (support.base / "cgroup.subtree_control").write_text("+memory")
        group = support.base / f"llamactl-{name}"
        group.mkdir(exist_ok=True)
        (group / "memory.max").write_text(str(memory_max))
        with contextlib.suppress(FileNotFoundError):  # older kernels lack it
            (group / "memory.swap.max").write_text("0")  # else the limit just moves to swap
        (group / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        raise ConfigError(f"cannot apply memory.max for {name!r}: {exc}") from exc
    return group


def remove_cgroup(group: Path) -> None:
    """Remove a server's group once its process is gone (rmdir; busy groups stay)."""
    with contextlib.suppress(OSError):
        group.rmdir()
