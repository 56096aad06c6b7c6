"""The real build: compile (or reuse) the default plan, then talk to the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "procman.cli"]


def run_cli(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def built(llama_server: Path) -> dict[str, object]:
    """`llamactl build --json` after the fixture made sure the build is cached."""
    started = time.monotonic()
    done = run_cli("build", "--json")
    assert done.returncode == 0, done.stderr
    doc: dict[str, object] = json.loads(done.stdout)
    doc["_wall"] = time.monotonic() - started
    return doc


def test_second_build_is_a_cache_hit_with_the_true_version(built: dict[str, object]) -> None:
    assert built["cached"] is True
    assert built["verified"] is True
    assert str(built["version"]).startswith("b11312 (0c1e570")
    defines = built["cmake_defines"]
    assert isinstance(defines, dict) and defines["LLAMA_USE_PREBUILT_UI"] == "OFF"
    # Not a timing assertion on speed, a sanity bound proving no compiler ran.
    assert float(str(built["_wall"])) < 60


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
    assert plan["backend"] == "cpu"  # no GPU on the project's machines
    assert set(plan["reasons"]) == set(plan["cmake_defines"])
    assert plan["cache_key"] == built["key"]
    assert plan["targets"] == ["llama-server", "llama-bench"]


def test_built_server_answers_a_chat_completion(
    built: dict[str, object], demo_model: Path, tmp_path: Path
) -> None:
    from openai import OpenAI

    from buildtools.verify import _free_port

    port = _free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(built["binary"]), "-m", str(demo_model), "--port", str(port), "-c", "512", "-np", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        client = OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=5
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                reply = client.chat.completions.create(
                    model="demo", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
                )
                break
            except Exception:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()
                assert time.monotonic() < deadline, "server never answered"
                time.sleep(0.2)
        assert reply.choices[0].message.content
        assert reply.usage is not None and reply.usage.completion_tokens > 0
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        log.close()


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
    done = run_cli("build", "--dry-run", "--backend", "cuda")
    assert done.returncode == 1
    assert "cuda is not available" in done.stderr
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


def test_interrupted_build_leaves_the_cache_consistent(llama_server: Path) -> None:
    """Ctrl-C mid-compile: exit 130, nothing published, no compiler left running;
    the next build of the same plan completes and is verified."""
    import signal

    import psutil

    plan_args = ("build", "-D", "GGML_LTO=OFF")  # a distinct cache key, same compile flags
    key = json.loads(run_cli(*plan_args, "--dry-run", "--json").stdout)["cache_key"]
    run_cli("builds", "--remove", key)
    proc = subprocess.Popen(
        [*CLI, *plan_args, "--json", "-j", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    from buildtools.paths import home

    log = home() / "work" / key / "llamactl-build.log"
    deadline = time.monotonic() + 300
    while not (log.is_file() and "[1/" in log.read_text(errors="replace")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the compile never started"
        time.sleep(0.2)
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    psutil.wait_procs(children, timeout=15)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    listed = json.loads(run_cli("builds", "--json").stdout)["builds"]
    assert key not in {b["key"] for b in listed}, "an interrupted build was published"
    assert not list((home() / "builds").glob(f".stage-{key}-*"))

    resumed = run_cli(*plan_args, "--json")
    assert resumed.returncode == 0, resumed.stderr
    doc = json.loads(resumed.stdout)
    assert doc["key"] == key and doc["cached"] is False and doc["verified"] is True
    run_cli("builds", "--remove", key)
