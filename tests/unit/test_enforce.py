"""The memory-limit policy with plain numbers, and cgroup v2 detection on fake trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from procman.errors import ConfigError
from procman.memory.enforce import (
    CgroupSupport,
    LimitAction,
    LimitSettings,
    MemoryLimit,
    detect_cgroup_v2,
    limit_in_cgroup,
)
from procman.memory.estimate import MiB


def policy(**changes: object) -> MemoryLimit:
    settings = {"memory_limit": 150 * MiB, "samples": 3, "seconds": 4.0, **changes}
    return MemoryLimit(LimitSettings(**settings))  # type: ignore[arg-type]


def test_sustained_excess_restarts_with_the_numbers() -> None:
    limit = policy()
    assert limit.observe(0.0, 212 * MiB) is None
    assert limit.observe(3.0, 212 * MiB) is None
    decision = limit.observe(6.0, 212 * MiB)
    assert decision is not None
    assert decision.action is LimitAction.RESTART
    assert decision.reason == "rss 212 MiB > limit 150 MiB for 6 s (3 samples)"
    assert (decision.used_bytes, decision.limit_bytes, decision.seconds_over) == (
        212 * MiB,
        150 * MiB,
        6.0,
    )
    assert limit.observe(9.0, 212 * MiB) is None  # counting starts over after a decision


def test_a_spike_does_not_count() -> None:
    limit = policy()
    for t, used in [(0, 200), (2, 200), (4, 100), (6, 200), (8, 200)]:
        assert limit.observe(float(t), used * MiB) is None


def test_enough_samples_but_too_short_a_time() -> None:
    limit = policy(seconds=10.0)
    assert [limit.observe(float(t), 200 * MiB) for t in range(3)] == [None] * 3
    decision = limit.observe(10.0, 200 * MiB, metric="pss")
    assert decision is not None and decision.reason.startswith("pss 200 MiB > limit")


def test_stop_policy_and_no_limit() -> None:
    decisions = [policy(action=LimitAction.STOP, samples=1, seconds=0).observe(0, 151 * MiB)]
    assert decisions[0] is not None and decisions[0].action is LimitAction.STOP
    unlimited = MemoryLimit(LimitSettings())
    assert all(unlimited.observe(float(t), 1 << 40) is None for t in range(10))


def test_bad_settings() -> None:
    with pytest.raises(ConfigError):
        LimitSettings(samples=0)
    with pytest.raises(ConfigError):
        LimitSettings(memory_limit=0)


# -- cgroup v2 on fake filesystem trees -------------------------------------------------------
V1_MOUNTS = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
HYBRID = V1_MOUNTS + "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
UNIFIED = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def fake_root(tmp_path: Path, mounts: str, group: str, controllers: str, subtree: str = "") -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(mounts)
    (tmp_path / "proc/self/cgroup").write_text(f"4:memory:/x\n0::{group}\n")
    cgroup2 = [line.split()[4] for line in mounts.splitlines() if " - cgroup2 " in line]
    mount = cgroup2[0] if cgroup2 else "/sys/fs/cgroup"
    base = tmp_path / mount.lstrip("/") / group.lstrip("/")
    base.mkdir(parents=True, exist_ok=True)
    (base / "cgroup.controllers").write_text(controllers + "\n")
    (base / "cgroup.subtree_control").write_text(subtree + "\n")
    return base


def test_cgroup_v1_only(tmp_path: Path) -> None:
    fake_root(tmp_path, V1_MOUNTS, "/", "memory")
    support = detect_cgroup_v2(tmp_path)
    assert not support.available and "cgroup v1" in support.reason


def test_hybrid_without_memory_controller(tmp_path: Path) -> None:
    fake_root(tmp_path, HYBRID, "/", "hugetlb")
    support = detect_cgroup_v2(tmp_path)
    assert not support.available
    assert support.reason == (
        "the memory controller is not delegated to /sys/fs/cgroup/unified "
        "(hybrid hierarchy: memory is on cgroup v1)"
    )


def test_group_with_processes_cannot_enable_memory_for_children(tmp_path: Path) -> None:
    fake_root(tmp_path, UNIFIED, "/user.slice/app.scope", "cpu memory pids")
    support = detect_cgroup_v2(tmp_path)
    assert not support.available and "no-internal-processes" in support.reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anything")
def test_not_delegated(tmp_path: Path) -> None:
    base = fake_root(tmp_path, UNIFIED, "/user.slice", "memory", "memory")
    base.chmod(0o555)
    try:
        support = detect_cgroup_v2(tmp_path)
    finally:
        base.chmod(0o755)
    assert not support.available and "not writable" in support.reason


def test_delegated_subtree_limits_a_pid(tmp_path: Path) -> None:
    base = fake_root(tmp_path, UNIFIED, "/user.slice/llamactl", "cpu memory", "memory")
    support = detect_cgroup_v2(tmp_path)
    assert support == CgroupSupport(
        available=True,
        reason="cgroup v2 memory.max under /sys/fs/cgroup/user.slice/llamactl",
        base=base,
    )
    group = limit_in_cgroup(support, "demo", 4242, 150 * MiB)
    assert (group / "memory.max").read_text() == str(150 * MiB)
    assert (group / "cgroup.procs").read_text() == "4242"


def test_limit_without_support_says_why() -> None:
    support = CgroupSupport(available=False, reason="no cgroup2 mount")
    with pytest.raises(ConfigError, match="no cgroup2 mount"):
        limit_in_cgroup(support, "demo", 1, 1)
