"""``llamactl deploy k8s`` without a cluster: golden manifests, strict schema checks, the
requests computed from the estimate, and the LeaderWorkerSet entrypoints' logic.

The estimates here are fixed values, so the golden files are the same on every
machine; the real estimate of the demo model, and the rendered leader and
worker commands run for real, are in ``tests/integration/test_deploy.py``.
Regenerate the golden files with ``LLAMACTL_UPDATE_GOLDEN=1``.
"""

from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from procman.config import parse_config
from procman.deploy.check import check_dir, check_object, lws_schema
from procman.deploy.entry import leader_argv, wait_for_workers, worker_argv, worker_names
from procman.deploy.k8s import Margins, render, router_config, write
from procman.errors import ConfigError
from procman.memory.estimate import Estimate

GOLDEN = Path(__file__).parent / "golden" / "k8s"
CRD = Path(__file__).resolve().parents[1] / "data" / "leaderworkerset-crd.json"
MIB = 1024 * 1024
CONFIG = """
[models.chat]
path = "demo"
ctx = 2048
parallel = 2
aliases = ["default"]
[models.big]
path = "demo"
ctx = 4096
rpc = ["a", "b"]
[workers.a]
endpoint = "127.0.0.1:50052"
[workers.b]
endpoint = "127.0.0.1:50053"
"""


def estimate(host: int, device: int, growth: int = 0) -> Estimate:
    return Estimate(host_bytes=host, device_bytes=device, host_growth_bytes=growth,
                    breakdown={}, settings={})  # fmt: skip


ESTIMATES = {"chat": estimate(300 * MIB, 0, 20 * MIB), "big": estimate(100 * MIB, 800 * MIB)}


def rendered() -> dict[str, list[dict[str, Any]]]:
    config = parse_config(tomllib.loads(CONFIG))
    return render(config, image="registry.example/llamactl:0.1", namespace="llm",
                  estimates=ESTIMATES)  # fmt: skip


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def test_the_manifests_equal_the_golden_files(tmp_path: Path) -> None:
    files = write(rendered(), tmp_path)
    if os.environ.get("LLAMACTL_UPDATE_GOLDEN"):
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for file in files:
            (GOLDEN / file.name).write_text(file.read_text())
    assert sorted(f.name for f in files) == sorted(p.name for p in GOLDEN.glob("*.yaml"))
    for file in files:
        assert file.read_text() == (GOLDEN / file.name).read_text(), file.name


@pytest.mark.parametrize("version", ["1.30", "1.37"])
def test_every_object_is_strictly_valid(tmp_path: Path, version: str) -> None:
    write(rendered(), tmp_path)
    count, problems, _ = check_dir(tmp_path, [version], CRD)
    assert count == 9
    assert problems == []


def test_the_leaderworkerset_satisfies_its_crd_and_a_broken_one_does_not() -> None:
    schema = lws_schema(CRD)
    (lws,) = by_kind(rendered()["big"], "LeaderWorkerSet")
    assert check_object(lws, "1.37", schema) is None
    broken = {**lws, "spec": {**lws["spec"], "startupPolicy": "WhenReady"}}
    assert "startupPolicy" in (check_object(broken, "1.37", schema) or "")


def test_an_unknown_field_fails_the_strict_check(tmp_path: Path) -> None:
    objects = rendered()
    deployment = by_kind(objects["chat"], "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    write(objects, tmp_path)
    _, problems, _ = check_dir(tmp_path, ["1.30"])
    assert [p.what for p in problems] == ["Deployment chat"]
    assert "resourcez" in problems[0].message


def test_requests_are_the_estimate_plus_the_margins() -> None:
    margins = Margins()
    objects = rendered()
    container = by_kind(objects["chat"], "Deployment")[0]["spec"]["template"]["spec"]["containers"][
        0
    ]
    chat = ESTIMATES["chat"]
    expected = math.ceil((chat.host_bytes + chat.host_growth_bytes) * 1.10) + 256 * MIB
    assert container["resources"]["requests"]["memory"] == f"{math.ceil(expected / MIB)}Mi"
    assert container["resources"]["limits"] == container["resources"]["requests"]
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    (lws,) = by_kind(objects["big"], "LeaderWorkerSet")
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 3
    assert template["restartPolicy"] == "RecreateGroupOnPodRestart"
    worker = template["workerTemplate"]["spec"]["containers"][0]
    share = 400 * MIB  # 800 MiB on the device, split over two workers
    expected = math.ceil(share * (1 + margins.memory_percent / 100)) + margins.supervisor_bytes
    assert worker["resources"]["requests"]["memory"] == f"{math.ceil(expected / MIB)}Mi"
    leader = template["leaderTemplate"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in leader["resources"]["requests"]  # the devices are the workers'


def test_a_gpu_model_requests_a_gpu() -> None:
    config = parse_config(tomllib.loads('[models.g]\npath = "demo"\ngpu_layers = "all"'))
    objects = render(config, image="i", namespace="n", estimates={"g": estimate(MIB, MIB)})
    container = by_kind(objects["g"], "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_probes_grace_and_headless_service() -> None:
    objects = rendered()["chat"]
    pod = by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["failureThreshold"] * 5 >= 120  # startup_timeout
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert pod["terminationGracePeriodSeconds"] >= 10  # ServerSpec.stop_grace
    headless = [s for s in by_kind(objects, "Service") if s["spec"].get("clusterIP") == "None"]
    assert [s["metadata"]["name"] for s in headless] == ["chat-pods"]


def test_the_network_policy_admits_rpc_from_the_leaders_only() -> None:
    (policy,) = by_kind(rendered()["big"], "NetworkPolicy")
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 50052}]
    assert rule["from"] == [{"podSelector": {"matchLabels": {
        "leaderworkerset.sigs.k8s.io/name": "big",
        "leaderworkerset.sigs.k8s.io/worker-index": "0"}}}]  # fmt: skip


def test_the_router_config_parses_and_serves_every_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMACTL_REPLICA_KEY", "k")
    text = router_config(parse_config(tomllib.loads(CONFIG)), "llm")
    parsed = parse_config(tomllib.loads(text))
    assert set(parsed.remote) == {"chat", "big"}
    chat = parsed.remote["chat"].discovery
    assert chat is not None
    assert (chat.kind, chat.name, chat.port) == ("dns", "chat-pods.llm.svc.cluster.local", 8080)
    assert parsed.remote["big"].replicas == ("http://big.llm.svc:8080",)
    assert parsed.remote["chat"].aliases == ("default",)


def test_worker_names_from_the_lws_environment() -> None:
    env = {"LWS_LEADER_ADDRESS": "big-0.big.llm", "LWS_GROUP_SIZE": "3", "LWS_WORKER_INDEX": "0"}
    assert worker_names(env, 50052) == ["big-0-1.big.llm:50052", "big-0-2.big.llm:50052"]
    assert worker_names({"LLAMACTL_RPC_WORKERS": "127.0.0.1:1, 127.0.0.1:2"}, 9) == [
        "127.0.0.1:1", "127.0.0.1:2"]  # fmt: skip
    with pytest.raises(ConfigError, match="LWS_LEADER_ADDRESS"):
        worker_names({}, 1)
    with pytest.raises(ConfigError, match="LWS_GROUP_SIZE"):
        worker_names({"LWS_LEADER_ADDRESS": "a-0.a.ns", "LWS_GROUP_SIZE": "x"}, 1)


def test_the_leader_waits_until_its_workers_resolve_and_accept() -> None:
    now = [0.0]
    seen: list[str] = []

    def resolve(name: str) -> str:
        if now[0] < 2 and name.startswith("big-0-2"):
            raise OSError("not yet in DNS")
        return "10.0.0.9" if "-2." in name else "10.0.0.8"

    def accepts(host: str, port: int, timeout: float) -> bool:
        seen.append(f"{host}:{port}")
        return True

    def pause(seconds: float) -> None:
        now[0] += seconds

    names = ["big-0-1.big.llm:50052", "big-0-2.big.llm:50052"]
    found = wait_for_workers(names, 10, resolve=resolve, accepts=accepts,
                             clock=lambda: now[0], pause=pause)  # fmt: skip
    assert found == ["10.0.0.8:50052", "10.0.0.9:50052"]
    with pytest.raises(ConfigError, match=r"big-0-2"):
        now[0] = 0.0
        wait_for_workers(names, 1, resolve=lambda n: (_ for _ in ()).throw(OSError()),
                         accepts=accepts, clock=lambda: now[0], pause=pause)  # fmt: skip
    assert leader_argv(["serve", "m"], found)[-3:] == [
        "--rpc", "10.0.0.8:50052,10.0.0.9:50052", "--trusted-network"]  # fmt: skip
    assert worker_argv({"POD_IP": "10.1.2.3"}, 50052)[:3] == ["worker", "--host", "10.1.2.3"]


def test_golden_files_are_yaml_without_anchors() -> None:
    for file in GOLDEN.glob("*.yaml"):
        text = file.read_text()
        assert "&id" not in text
        assert all(isinstance(d, dict) for d in yaml.safe_load_all(text) if d)
