"""The real build: compile (or reuse) the default plan, then talk to the result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from buildtools import BuildResult
from buildtools.cache import BuildCache
from buildtools.paths import home
from tests.integration.conftest import Processes

CLI = [sys.executable, "-m", "procman.cli"]
#: the order `--backend auto` tries the GPU backends in (README, `llamactl build`)
GPU_BACKENDS = ("cuda", "metal", "vulkan", "opencl")


def run_cli(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def detected() -> dict[str, dict[str, object]]:
    done = run_cli("detect", "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    backends: dict[str, dict[str, object]] = json.loads(done.stdout)["backends"]
    return backends


@pytest.fixture(scope="module")
def built(default_build: BuildResult) -> dict[str, object]:
    """`llamactl build --json` after the fixture made sure the build is cached."""
    log = Path(str(default_build.build.manifest["log"]))
    before = log.stat().st_mtime_ns if log.exists() else None
    done = run_cli("build", "--json")
    assert done.returncode == 0, done.stderr
    doc: dict[str, object] = json.loads(done.stdout)
    doc["_log_untouched"] = (log.stat().st_mtime_ns if log.exists() else None) == before
    return doc


def test_second_build_is_a_cache_hit_with_the_true_version(built: dict[str, object]) -> None:
    assert built["cached"] is True
    assert built["verified"] is True
    assert str(built["version"]).startswith("b11312 (0c1e570")
    defines = built["cmake_defines"]
    assert isinstance(defines, dict) and defines["LLAMA_USE_PREBUILT_UI"] == "OFF"
    # no configure or compile step ran: each would have rewritten the build's log
    assert built["_log_untouched"] is True


def test_binary_reports_build_11312(built: dict[str, object]) -> None:
    out = subprocess.run(
        [str(built["binary"]), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert "build 11312" in out.stdout + out.stderr
    assert "0c1e570" in out.stdout + out.stderr


def test_dry_run_plan_matches_the_cached_build(built: dict[str, object]) -> None:
    done = run_cli("build", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    backends = detected()
    usable = [b for b in GPU_BACKENDS if backends[b]["available"]]
    assert plan["backend"] == (usable[0] if usable else "cpu")  # what `auto` means here
    assert set(plan["reasons"]) == set(plan["cmake_defines"])
    assert plan["cache_key"] == built["key"]
    assert plan["targets"] == [
        "llama-server",
        "llama-bench",
        "ggml-rpc-server",
        "llama-fit-params",
    ]


def test_built_server_answers_a_chat_completion(
    built: dict[str, object], demo_model: Path, tmp_path: Path, processes: Processes
) -> None:
    from openai import OpenAI

    from buildtools._ports import pick_free_port

    port = pick_free_port()
    with (tmp_path / "server.log").open("wb") as log:
        proc = processes.popen(
            [built["binary"], "-m", demo_model, "--port", str(port), "-c", "512", "-np", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}/v1"
    client = OpenAI(base_url=base, api_key="none", max_retries=0, timeout=5)
    deadline = time.monotonic() + 120
    while True:
        try:
            reply = client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
            )
            break
        except Exception:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "llama-server did not answer within 120 s"
            time.sleep(0.2)
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    proc.terminate()
    assert proc.wait(timeout=30) == 0


def test_builds_lists_it_and_serve_would_use_it(built: dict[str, object]) -> None:
    done = run_cli("builds", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    keys = {b["key"]: b for b in doc["builds"]}
    assert keys[str(built["key"])]["usable"] is True
    if not os.environ.get("LLAMACTL_SERVER"):
        assert doc["serve_uses"]["origin"] == "cache"


def test_bad_source_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "CMakeLists.txt").write_text("")
    done = run_cli("build", "--dry-run", "--source", str(tmp_path))
    assert done.returncode == 1
    assert "not a llama.cpp source tree" in done.stderr
    assert "Traceback" not in done.stderr


def test_unavailable_backend_is_a_clear_error() -> None:
    missing = [name for name, status in detected().items() if not status["available"]]
    if not missing:
        pytest.skip("every backend is available on this machine")
    done = run_cli("build", "--dry-run", "--backend", missing[0])
    assert done.returncode == 1
    assert f"{missing[0]} is not available" in done.stderr
    assert "Traceback" not in done.stderr


def test_failing_configure_reports_command_status_and_log_tail(tmp_path: Path) -> None:
    """A real cmake run that fails: the user sees the command, exit status and log tail."""
    tree = tmp_path / "broken-llama"
    for rel in ("ggml/CMakeLists.txt", "include/llama.h", "tools/server/server.cpp"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("")
    (tree / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.14)\n"
        "project(broken NONE)\n"
        'message(FATAL_ERROR "boom from the tree")\n'
    )
    done = run_cli("build", "--source", str(tree), "-j", "1", timeout=600)
    assert done.returncode == 1
    assert "the configure step failed" in done.stderr
    assert "exit status: 1" in done.stderr
    assert "boom from the tree" in done.stderr
    assert "full log:" in done.stderr
    assert "Traceback" not in done.stderr
    listed = json.loads(run_cli("builds", "--json").stdout)
    assert all("broken-llama" not in json.dumps(b) for b in listed["builds"]), (
        "a failed build was cached"
    )


def objects_to_rebuild(work: Path, count: int = 3) -> list[Path]:
    """A few mid-sized objects of a build tree: without them the next compile is short
    (a few seconds per object, then the links) but long enough to be interrupted."""
    objects = sorted(work.glob("common/**/*.o"), key=lambda o: o.stat().st_size)
    middle = len(objects) // 2
    return objects[middle : middle + count]


@pytest.mark.compile
@pytest.mark.slow
@pytest.mark.before_the_build
def test_interrupted_build_leaves_the_cache_consistent(processes: Processes) -> None:
    """Ctrl-C mid-compile: exit 130, nothing published, no compiler left running;
    the next build of the same plan completes and is verified.

    On a cold cache the build interrupted is the default one (this test runs
    first), and its completion is the build every other test uses: one compile
    in all. With the default build cached, the build interrupted is a plan of
    its own (the default's flags under another cache key). That plan's build
    tree stays in the cache between runs, a few of its objects deleted so that
    there is a compile to interrupt: a full compile (~6 min on 2 cores without
    ccache) the first time only; `$LLAMACTL_HOME/work/KEY` is that tree.
    """
    cache = BuildCache(home())
    default = json.loads(run_cli("build", "--dry-run", "--json").stdout)["cache_key"]
    cold = cache.get(default) is None
    plan_args = ("build",) if cold else ("build", "-D", "GGML_LTO=OFF")
    key = json.loads(run_cli(*plan_args, "--dry-run", "--json").stdout)["cache_key"]
    assert cold or key != default
    cache.remove(key, work=False)  # unpublished; the build tree (if any) is kept
    work = home() / "work" / key
    for stale in objects_to_rebuild(work):
        stale.unlink()
    log = work / "llamactl-build.log"
    log.unlink(missing_ok=True)  # a previous build's '[1/' must not count

    proc = processes.popen(
        [*CLI, *plan_args, "--json", *(() if cold else ("-j", "1"))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # a cold start fetches the source and configures first: minutes on a slow machine
    deadline = time.monotonic() + 900
    while not (log.is_file() and "[1/" in log.read_text(errors="replace")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no compile step finished in 900 s ({log})"
        time.sleep(0.1)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert "ninja" in {c.name() for c in children}, "interrupted outside the compile"
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("llamactl build did not exit within 120 s of SIGINT")
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not [c for c in alive if c.status() != psutil.STATUS_ZOMBIE], alive
    listed = json.loads(run_cli("builds", "--json").stdout)["builds"]
    assert key not in {b["key"] for b in listed}, "an interrupted build was published"
    assert not list((home() / "builds").glob(f".stage-{key}-*"))

    resumed = run_cli(*plan_args, "--json")
    assert resumed.returncode == 0, resumed.stderr
    doc = json.loads(resumed.stdout)
    assert doc["key"] == key and doc["cached"] is False and doc["verified"] is True
    if not cold:
        cache.remove(key, work=False)
