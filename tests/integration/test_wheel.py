"""The platform wheel carries the verified server and works from a fresh venv."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import venv
import zipfile
from pathlib import Path

import pytest

from buildtools import BuildResult
from buildtools.plan import NOT_IN_KEY
from tests.integration.conftest import Processes


@pytest.fixture(scope="module")
def wheel(default_build: BuildResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`llamactl build --wheel`; the compile is the cached default build."""
    out = tmp_path_factory.mktemp("wheels")
    done = subprocess.run(
        [sys.executable, "-m", "procman.cli", "build", "--wheel", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reused from the cache" in done.stderr, "the wheel recompiled a cached plan"
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wheel_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, with_pip=True)
    pip = subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    return env_dir


def local_label(build: BuildResult) -> str:
    """The label the README promises for a build: ``cpu``, ``cpu.portable``, ``cu130``..."""
    backend = str(build.plan.backend)
    if backend == "cuda":
        nvcc = re.search(r"nvcc@(\d+)\.(\d+)", build.build.manifest["compiler"])
        assert nvcc, build.build.manifest["compiler"]
        backend = f"cu{nvcc[1]}{nvcc[2]}"
    portable = build.plan.cmake_defines.get("GGML_BACKEND_DL") == "ON"
    return f"{backend}.portable" if portable else backend


def test_wheel_carries_the_server_and_its_plan(wheel: Path, default_build: BuildResult) -> None:
    platform_tag = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    expected = f"+{local_label(default_build)}-py3-none-{platform_tag}.whl"
    assert wheel.name.endswith(expected), (wheel.name, expected)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "buildtools/bin/llama-server" in names
        assert "buildtools/bin/ggml-rpc-server" in names, "the wheel carries the RPC worker"
        page = {f"procman/router/ui/{f}" for f in ("index.html", "app.js", "ui.css")}
        assert page <= names, "the wheel carries the /ui dashboard's files"
        manifest = json.loads(zf.read("buildtools/bin/llamactl-build.json"))
        mode = zf.getinfo("buildtools/bin/llama-server").external_attr >> 16
    assert mode & 0o111, "llama-server lost its executable bit"
    assert manifest["key"] == default_build.build.key
    assert manifest["verified"]["ok"] is True
    # the cached build may have been made before ccache was installed (or after it
    # went): GGML_CCACHE is not part of the key, and the manifest tells the truth
    shipped = manifest["plan"]["cmake_defines"]
    planned = default_build.plan.cmake_defines
    assert {k: v for k, v in shipped.items() if k not in NOT_IN_KEY} == {
        k: v for k, v in planned.items() if k not in NOT_IN_KEY
    }


def test_installed_wheel_serves_with_its_bundled_server(wheel_venv: Path, tmp_path: Path) -> None:
    env = {**os.environ, "LLAMACTL_HOME": str(tmp_path / "empty-home")}
    env.pop("LLAMACTL_SERVER", None)
    done = subprocess.run(
        [str(wheel_venv / "bin" / "llamactl"), "builds", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    uses = json.loads(done.stdout)["serve_uses"]
    assert uses["origin"] == "bundled", uses
    assert str(wheel_venv) in uses["binary"]
    version = subprocess.run(
        [uses["binary"], "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert "build 11312" in version.stdout + version.stderr
    worker = subprocess.run(
        [str(wheel_venv / "bin" / "python"), "-c",
         "import buildtools; w = buildtools.resolve_worker(); print(w.origin, w.binary)"],
        capture_output=True, text=True, timeout=120, check=False, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr
    origin, binary = worker.stdout.split()
    assert origin == "bundled" and binary.endswith("buildtools/bin/ggml-rpc-server")


def test_installed_wheel_serves_the_demo_model(
    wheel_venv: Path, demo_model: Path, tmp_path: Path, processes: Processes
) -> None:
    """`llamactl serve` from a fresh venv, no cache, no compiler: the bundled server answers."""
    from openai import OpenAI

    from buildtools._ports import pick_free_port

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copy(demo_model, home / "models" / demo_model.name)  # skip a 98 MB re-download
    marker = demo_model.parent / f".{demo_model.name}.sha256"
    shutil.copy(marker, home / "models" / marker.name)
    env = {**os.environ, "LLAMACTL_HOME": str(home), "PATH": f"{wheel_venv}/bin:/usr/bin:/bin"}
    env.pop("LLAMACTL_SERVER", None)
    port = pick_free_port()
    proc = processes.popen(
        [wheel_venv / "bin" / "llamactl", "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    serves_the_bundled_server(proc)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=30)
    reply = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert reply.choices[0].message.content
    proc.terminate()
    assert proc.wait(timeout=30) == 0


def serves_the_bundled_server(proc: subprocess.Popen[str]) -> list[str]:
    """What ``llamactl serve`` (stdout and stderr in one pipe) printed until it was ready;
    fails the test if it never was, or if the server it ran is not the wheel's own."""
    lines: list[str] = []
    watchdog = threading.Timer(180, proc.kill)  # ends the read below if serve never says ready
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "ready" in line and "/v1" in line:
                break
        else:
            pytest.fail("serve exited (or was not ready in 180 s):\n" + "".join(lines))
    finally:
        watchdog.cancel()
    assert any("bundled in the installed wheel" in line for line in lines), "".join(lines)
    return lines
