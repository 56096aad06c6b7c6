"""``llamactl deploy k8s`` for real: the demo model's real estimate in the requests, the
offline check from the command line, and a smoke run of the rendered LeaderWorkerSet
commands on this machine with the environment LeaderWorkerSet would inject.

What a real cluster does with these manifests (scheduling, restarts of a group,
NetworkPolicy enforcement) is not tested here: see the README.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from buildtools import BuildResult
from tests.integration.conftest import Processes

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "procman.cli"]
CRD = REPO / "tests" / "data" / "leaderworkerset-crd.json"
CONFIG = """
[models.chat]
path = "demo"
ctx = 2048
parallel = 2
[models.big]
path = "demo"
ctx = 1024
rpc = ["a"]
[workers.a]
endpoint = "127.0.0.1:50052"
"""


@pytest.fixture
def env(tmp_path: Path, default_build: BuildResult) -> dict[str, str]:
    build = default_build.build
    return {**os.environ, "LLAMACTL_HOME": str(tmp_path / "home"), "LLAMACTL_LOG": "WARNING",
            "LLAMACTL_SERVER": str(build.binary), "LLAMACTL_RPC_SERVER": str(build.rpc_worker),
            "COLUMNS": "300"}  # fmt: skip


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rendered(tmp_path: Path, env: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    (tmp_path / "models.toml").write_text(CONFIG)
    out = tmp_path / "k8s"
    config = str(tmp_path / "models.toml")
    image = "registry.example/llamactl:0.1"
    args = ["--config", config, "--image", image, "--namespace", "llm", "--out", str(out)]
    done = run(["deploy", "k8s", *args], env)
    assert done.returncode == 0, done.stderr
    return {f.stem: list(yaml.safe_load_all(f.read_text())) for f in out.glob("*.yaml")}


def test_requests_are_the_real_estimate_plus_margins_and_the_check_passes(
    tmp_path: Path, env: dict[str, str]
) -> None:
    objects = rendered(tmp_path, env)
    done = run(["estimate", "demo", "--ctx", "2048", "--parallel", "2", "--json"], env)
    assert done.returncode == 0, done.stderr
    est = json.loads(done.stdout)
    host = est["host_bytes"] + est["host_growth_bytes"]
    expected = math.ceil((math.ceil(host * 1.10) + 256 * 2**20) / 2**20)
    (deployment,) = [o for o in objects["chat"] if o["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["memory"] == f"{expected}Mi"
    crd = ["--lws-crd", str(CRD)]
    done = run(["deploy", "k8s", "--check", str(tmp_path / "k8s"), *crd], env)
    assert done.returncode == 0, done.stderr
    assert "valid: 9 objects" in done.stderr.replace("\n", " ")


def test_bad_inputs_are_clear_errors(tmp_path: Path, env: dict[str, str]) -> None:
    done = run(["deploy", "k8s", "--config", "models.toml"], env)
    assert done.returncode != 0
    assert "--image" in done.stderr
    assert "Traceback" not in done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run(["deploy", "k8s", "--check", str(empty)], env)
    assert done.returncode != 0
    assert "no .yaml files" in done.stderr
    done = run(["deploy", "entrypoint", "leader", "--", "serve", "demo"], env)
    assert done.returncode != 0
    assert "LWS_LEADER_ADDRESS" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_rendered_leader_and_worker_commands_answer(
    tmp_path: Path, env: dict[str, str], processes: Processes
) -> None:
    """As LeaderWorkerSet runs them: the worker with LWS_WORKER_INDEX=1 and its POD_IP, the
    leader with index 0; only ports differ (8080 and 50052 may be taken here) and the
    workers are named by LLAMACTL_RPC_WORKERS (pod names do not resolve on this machine)."""
    objects = rendered(tmp_path, env)
    (lws,) = [o for o in objects["big"] if o["kind"] == "LeaderWorkerSet"]
    template = lws["spec"]["leaderWorkerTemplate"]
    leader_args = list(template["leaderTemplate"]["spec"]["containers"][0]["args"])
    worker_args = list(template["workerTemplate"]["spec"]["containers"][0]["args"])
    rpc_port, http_port = free_port(), free_port()

    def replace(args: list[str], flag: str, value: str) -> None:
        args[args.index(flag) + 1] = value

    replace(worker_args, "--rpc-port", str(rpc_port))
    replace(leader_args, "--rpc-port", str(rpc_port))
    replace(leader_args, "--port", str(http_port))
    replace(leader_args, "--host", "127.0.0.1")
    lws_env = {"LWS_LEADER_ADDRESS": "big-0.big.llm", "LWS_GROUP_SIZE": "2"}
    log = (tmp_path / "worker.log").open("ab")
    worker_env = env | lws_env | {"LWS_WORKER_INDEX": "1", "POD_IP": "127.0.0.1"}
    processes.popen([*CLI, *worker_args], cwd=REPO, stdout=log, stderr=log, env=worker_env)
    leader_env = env | lws_env | {"LWS_WORKER_INDEX": "0", "LLAMACTL_API_KEY": "k",
                                  "LLAMACTL_RPC_WORKERS": f"127.0.0.1:{rpc_port}"}  # fmt: skip
    log = (tmp_path / "leader.log").open("ab")
    leader = processes.popen([*CLI, *leader_args], cwd=REPO, stdout=log, stderr=log,
                             env=leader_env)  # fmt: skip
    message = {"role": "user", "content": "Say hello."}
    body = json.dumps({"model": "big", "max_tokens": 4, "messages": [message]}).encode()
    deadline = time.monotonic() + 180
    while True:
        assert leader.poll() is None, (tmp_path / "leader.log").read_text()[-3000:]
        request = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v1/chat/completions", data=body,
            headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:  # noqa: S310 - loopback
                answer = json.loads(resp.read())
                break
        except OSError:
            assert time.monotonic() < deadline, (tmp_path / "leader.log").read_text()[-3000:]
            time.sleep(0.5)  # another process's port and model load: nothing to await here
    assert answer["choices"][0]["message"]["content"]
    text = (tmp_path / "leader.log").read_text()
    assert "waiting for 1 RPC workers" in text
    assert f"--rpc 127.0.0.1:{rpc_port}" in text
