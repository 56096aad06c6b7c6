"""The portable, repaired wheel: manylinux, each library once, installable from a
wheelhouse, and serving the demo model from a fresh venv with an empty environment.

The compile is the cached portable build (``llamactl build --portable``): the
first run on a machine makes it once (the CPU variants make it about twice as
long as the default build), later runs take the wheel from the cache.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from buildtools import BuildResult
from buildtools.wheel import duplicate_libraries
from buildtools.wheelhouse import add_wheel
from tests.conftest import MARK
from tests.integration.conftest import Processes
from tests.integration.test_wheel import serves_the_bundled_server

pytestmark = [pytest.mark.compile, pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def portable_build(demo_model: Path) -> BuildResult:
    from buildtools import BuildOptions, build, provision
    from buildtools.hardware import detect

    return build(detect(), BuildOptions(portable=True), provision(), model=demo_model)


@pytest.fixture(scope="module")
def repaired_wheel(portable_build: BuildResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`llamactl build --wheel --portable --repair`, from the cached portable build."""
    out = tmp_path_factory.mktemp("dist")
    argv = [sys.executable, "-m", "procman.cli", "build", "--wheel", "--portable", "--repair"]
    done = subprocess.run(
        [*argv, "--out", str(out)], capture_output=True, text=True, timeout=1200, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reused from the cache" in done.stderr, "the wheel recompiled a cached plan"
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wheelhouse(repaired_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheelhouse")
    add_wheel(repaired_wheel, root)
    return root


@pytest.fixture(scope="module")
def installed(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv that took llamactl-server from the wheelhouse's cpu index.

    ``--index-url`` alone first (the wheelhouse must resolve the name by itself,
    and picks the variant), then the user's command with ``--extra-index-url``,
    which brings the dependencies from the package index.
    """
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, with_pip=True)
    index = (wheelhouse / "cpu").as_uri()
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q"]
    for args in (["--no-deps", "--index-url", index], ["--extra-index-url", index]):
        done = subprocess.run(
            [*pip, *args, "llamactl-server"],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    return env_dir


def test_repaired_wheel_is_manylinux_with_each_library_once(
    repaired_wheel: Path, portable_build: BuildResult
) -> None:
    m = re.fullmatch(
        r"llamactl_server-[^+]+\+cpu\.portable-py3-none-(manylinux_2_\d+_x86_64)(\..+)?\.whl",
        repaired_wheel.name,
    )
    assert m, repaired_wheel.name
    show = subprocess.run(
        [sys.executable, "-m", "auditwheel", "show", str(repaired_wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert show.returncode == 0, show.stderr
    text = " ".join(show.stdout.split())
    assert f'consistent with the following platform tag: "{m.group(1)}"' in text, text
    assert duplicate_libraries(repaired_wheel) == {}
    with zipfile.ZipFile(repaired_wheel) as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("buildtools/bin/llamactl-build.json"))
    variants = sorted(n for n in names if re.search(r"/libggml-cpu-[^/]+\.so$", n))
    assert len(variants) >= 2, names  # one per instruction-set level
    assert manifest["key"] == portable_build.build.key
    assert manifest["cpu_variant"] in {v.rsplit("/", 1)[-1] for v in variants}


def test_wheelhouse_serves_the_variant(wheelhouse: Path, installed: Path) -> None:
    pages = sorted(str(p.relative_to(wheelhouse)) for p in wheelhouse.rglob("index.html"))
    assert pages == ["cpu/index.html", "cpu/llamactl-server/index.html", "index.html"]
    done = subprocess.run(
        [str(installed / "bin" / "python"), "-m", "pip", "show", "llamactl-server"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert re.search(r"(?m)^Version: .+\+cpu\.portable$", done.stdout), done.stdout


def test_installed_portable_wheel_serves_with_an_empty_environment(
    installed: Path, demo_model: Path, tmp_path: Path, processes: Processes
) -> None:
    """`env -i`: no PATH, no HOME, no compiler, an empty llamactl home; only the
    test session's marker, which lets the leak check find the processes."""
    import os

    from buildtools._ports import pick_free_port

    home = tmp_path / "home"
    llamactl = installed / "bin" / "llamactl"
    bare = ["env", "-i", f"LLAMACTL_HOME={home}", f"{MARK}={os.environ[MARK]}"]
    version = subprocess.run(
        [*bare, str(llamactl), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert version.returncode == 0, version.stderr
    assert "variant cpu.portable" in version.stdout, version.stdout
    port = pick_free_port()
    proc = processes.popen(
        [*bare, llamactl, "serve", str(demo_model), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    serves_the_bundled_server(proc)
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert reply.choices[0].message.content
    proc.terminate()
    assert proc.wait(timeout=30) == 0
