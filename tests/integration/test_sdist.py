"""The sdist round trip: `python -m build --sdist`, then `pip install` of that sdist
into a fresh venv, as a user without a checkout would.

The sdist carries what the build needs (pyproject, CMakeLists, the build layer)
and nothing it does not: no llama.cpp checkout (the build fetches the pinned
tarball), no venvs, caches or bench results. Installing it runs the wheel build,
whose compile is the cached default build here (on a fresh machine: the ~10
minute compile the README describes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

import pytest

from buildtools import BuildResult
from tests.conftest import MARK

pytestmark = [pytest.mark.slow]

#: the sdist is source text and a screenshot; bench results or a model would blow this
MAX_SDIST_BYTES = 3 << 20


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "-o", str(out), str(root)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (made,) = out.glob("llamactl_server-*.tar.gz")
    return made


def test_sdist_carries_the_build_and_nothing_else(sdist: Path) -> None:
    assert sdist.stat().st_size < MAX_SDIST_BYTES, sdist.stat().st_size
    with tarfile.open(sdist) as tf:
        top = tf.getnames()[0].split("/")[0]
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
        biggest = max(tf.getmembers(), key=lambda m: m.size)
    for needed in (
        "pyproject.toml",
        "CMakeLists.txt",
        "README.md",
        "PKG-INFO",
        "buildtools/wheel.py",
        "buildtools/source.py",
        "procman/cli/_main.py",
    ):
        assert needed in names, needed
    for unwanted in ("llama.cpp/", ".venv/", ".nox/", "__pycache__", ".git/", "bench/results/"):
        assert not any(unwanted in f"{n}/" for n in names), unwanted
    assert top.startswith("llamactl_server-")
    assert biggest.size < 1 << 20, (biggest.name, biggest.size)


def test_sdist_installs_into_a_fresh_venv(
    sdist: Path, default_build: BuildResult, tmp_path: Path
) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    done = subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-v", str(sdist)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    # the wheel build went through the cache, as `llamactl build` does
    assert "reused from the cache" in done.stdout + done.stderr
    version = subprocess.run(
        [str(env_dir / "bin" / "llamactl"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert version.returncode == 0, version.stderr
    first, second = version.stdout.splitlines()[:2]
    assert first.startswith("llamactl-server 0.1.0")
    assert default_build.build.key in second and "variant cpu" in second
    builds = subprocess.run(
        [str(env_dir / "bin" / "llamactl"), "builds", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            "PATH": "/usr/bin:/bin",
            "LLAMACTL_HOME": str(tmp_path / "empty-home"),
            MARK: os.environ[MARK],
        },
    )
    assert builds.returncode == 0, builds.stderr
    assert json.loads(builds.stdout)["serve_uses"]["origin"] == "bundled"
