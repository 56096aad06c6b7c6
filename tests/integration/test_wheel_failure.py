"""A compile that fails under `pip wheel` shows its cause in pip's own output.

pip hides a build's output unless it fails, and then replays it: the replay
must hold the failing command and the compiler's error, not only "exit 1".
The compile is made to fail early and cheaply: ``GGML_SCHED_MAX_COPIES`` is a
number that ggml-backend.cpp (one of the first files) compiles in.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from buildtools import BuildResult

pytestmark = [pytest.mark.slow]


def test_failed_compile_under_pip_prints_the_command_and_the_log_tail(
    default_build: BuildResult, demo_model: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    marker = demo_model.parent / f".{demo_model.name}.sha256"
    for path in (demo_model, marker):  # the build checks the demo model is there first
        (home / "models" / path.name).symlink_to(path)
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "LLAMACTL_HOME": str(home),  # the failed tree stays out of the real cache
        "LLAMACTL_SOURCE": default_build.build.manifest["source"]["path"],
    }
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "-w", str(tmp_path),
         "-C", "cmake.define.GGML_SCHED_MAX_COPIES=not_a_number"],
        capture_output=True, text=True, timeout=1200, check=False, env=env,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "llamactl: error: the compile step failed" in output, output[-3000:]
    assert "llamactl: failed command: " in output and "--build" in output
    assert f"llamactl: full log: {home}" in output
    tail = [line for line in output.splitlines() if "llamactl:   | " in line]  # pip indents
    assert any("not_a_number" in line for line in tail), output[-3000:]
