"""``models.toml`` -> Kubernetes manifests: what ``llamactl deploy k8s`` writes.

Kubernetes places and restarts the pods; llamactl contributes what it knows:
each model's memory from :func:`procman.memory.estimate.estimate` (requests
and limits are that plus the stated margins), probes on ``/health``, a grace
period from the stop timeout, and for a model split across RPC workers a
LeaderWorkerSet whose group restarts as one (``RecreateGroupOnPodRestart``:
the leader aborts when a worker is lost, see ``DISTRIBUTED.md``).

Objects, as plain dicts (``render``), written one file per model
(``write``):

* the router: a ConfigMap holding its ``models.toml`` (every model a
  ``[remote.NAME]`` whose replicas are the model's pods, found in its headless
  Service's DNS records; an RPC model's group leader behind its Service), a
  Deployment and a Service;
* a model: a Deployment (``llamactl serve`` on 0.0.0.0 with the key from the
  ``llamactl`` Secret), its Service, and a headless Service (one DNS record
  per ready pod);
* a model with ``rpc``: a LeaderWorkerSet of 1 + workers pods (the leader runs
  ``llamactl deploy entrypoint leader``, which finds its workers from the LWS
  environment), its Service, and a NetworkPolicy admitting the RPC port on the
  workers from the leaders of the set only (the protocol has no authentication).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from procman.config import Config, ModelSection
    from procman.memory.estimate import Estimate

__all__ = [
    "PORT", "RPC_PORT", "SECRET", "Margins", "Resources", "render", "resources",
    "worker_resources", "write",
]  # fmt: skip

PORT = 8080
RPC_PORT = 50052
#: the Secret the user creates: ``api-key`` (the router's) and ``replica-key`` (the models')
SECRET = "llamactl"  # noqa: S105 - the Secret's name, not a secret
_MIB = 1024 * 1024
_LWS = "leaderworkerset.sigs.k8s.io"


@dataclass(frozen=True, kw_only=True)
class Margins:
    """What is added to the estimate (stated in the README and each manifest's annotation)."""

    memory_percent: float = 10.0
    """Host memory on top of the estimate (fragmentation, the estimate's own error)."""
    supervisor_bytes: int = 256 * _MIB
    """The llamactl process beside llama-server (Python, the router, the meter)."""
    cpu: str = "2"
    """CPU request and limit per model pod (the estimate says nothing about CPU)."""
    router_memory_bytes: int = 256 * _MIB
    """Memory request and limit of the router pod."""


@dataclass(frozen=True, kw_only=True)
class Resources:
    """One container's resources, from an estimate and the margins."""

    memory_bytes: int
    gpus: int
    estimate_host_bytes: int
    estimate_device_bytes: int

    def to_k8s(self, cpu: str) -> dict[str, Any]:
        amount: dict[str, Any] = {"cpu": cpu, "memory": f"{math.ceil(self.memory_bytes / _MIB)}Mi"}
        if self.gpus:
            amount["nvidia.com/gpu"] = str(self.gpus)
        return {"requests": dict(amount), "limits": dict(amount)}


def resources(est: Estimate, margins: Margins, *, workers: int = 0) -> Resources:
    """Memory = (host estimate + its growth) x (1 + margin) + the supervisor; a GPU when any
    bytes live on the device. Requests equal limits: memory is not overcommitted. With RPC
    ``workers`` the device bytes are theirs (see :func:`worker_resources`), as the
    supervisor's admission counts them (``memory._limits``)."""
    host = est.host_bytes + est.host_growth_bytes
    memory = math.ceil(host * (1 + margins.memory_percent / 100)) + margins.supervisor_bytes
    return Resources(
        memory_bytes=memory,
        gpus=1 if est.device_bytes > 0 and not workers else 0,
        estimate_host_bytes=est.host_bytes,
        estimate_device_bytes=est.device_bytes,
    )


def resources_none() -> Resources:
    return Resources(memory_bytes=0, gpus=0, estimate_host_bytes=0, estimate_device_bytes=0)


def worker_resources(est: Estimate, margins: Margins, workers: int) -> Resources:
    """An RPC worker on CPU: an even share of the offloaded bytes, plus the margin and the
    llamactl process beside ggml-rpc-server (``tensor_split`` unset: llama.cpp splits by
    free memory, so even shares are what equal pods get)."""
    share = math.ceil(est.device_bytes / workers)
    memory = math.ceil(share * (1 + margins.memory_percent / 100)) + margins.supervisor_bytes
    return Resources(memory_bytes=memory, gpus=0, estimate_host_bytes=share,
                     estimate_device_bytes=0)  # fmt: skip


def _meta(name: str, namespace: str, component: str, **extra: Any) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "llamactl",
              "app.kubernetes.io/component": component}  # fmt: skip
    return {"name": name, "namespace": namespace, "labels": labels, **extra}


def _selector(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name}


def _secret_env(variable: str, key: str) -> dict[str, Any]:
    return {"name": variable, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": key}}}


def _probes(startup_timeout: float) -> dict[str, Any]:
    check = {"httpGet": {"path": "/health", "port": "http"}}
    period = 5
    return {
        "startupProbe": {**check, "periodSeconds": period,
                         "failureThreshold": max(1, math.ceil(startup_timeout / period))},
        "readinessProbe": {**check, "periodSeconds": period, "failureThreshold": 2},
    }  # fmt: skip


def _serve_args(name: str, model: ModelSection) -> list[str]:
    args = ["serve", model.path, "--name", name, "--host", "0.0.0.0", "--port", str(PORT)]  # noqa: S104 - a pod's own interface, keyed
    args += ["--ctx", str(model.ctx)] if model.ctx else []
    args += ["--parallel", str(model.parallel), "--metrics", *model.args]
    return args


def _service(
    name: str, namespace: str, component: str, *, headless: bool = False,
    port: int = PORT, selector: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    spec: dict[str, Any] = {
        "selector": selector or _selector(name),
        "ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}],
    }
    if headless:
        spec |= {"clusterIP": "None", "publishNotReadyAddresses": False}
    service_name = f"{name}-pods" if headless else name
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(service_name, namespace, component), "spec": spec}  # fmt: skip


def _container(name: str, image: str, args: Sequence[str], res: dict[str, Any],
               env: list[dict[str, Any]], port: int, port_name: str) -> dict[str, Any]:  # fmt: skip
    return {
        "name": name, "image": image, "args": list(args), "env": env,
        "ports": [{"name": port_name, "containerPort": port, "protocol": "TCP"}],
        "resources": res,
        "securityContext": {"allowPrivilegeEscalation": False},
    }  # fmt: skip


def _model(
    name: str, model: ModelSection, image: str, namespace: str, res: Resources,
    margins: Margins, worker_res: Resources | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    annotations = {
        "llamactl.dev/estimate-host-bytes": str(res.estimate_host_bytes),
        "llamactl.dev/estimate-device-bytes": str(res.estimate_device_bytes),
        "llamactl.dev/margins": f"memory +{margins.memory_percent:g}% "
        f"+{margins.supervisor_bytes // _MIB}Mi (llamactl)",
    }
    env = [_secret_env("LLAMACTL_API_KEY", "replica-key")]
    grace = math.ceil(10.0 + 5)  # ServerSpec.stop_grace (SIGTERM -> SIGKILL) + the router's drain
    if not model.rpc:
        container = _container("llamactl", image, _serve_args(name, model),
                               res.to_k8s(margins.cpu), env, PORT, "http")  # fmt: skip
        container |= _probes(model.startup_timeout)
        deployment = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _meta(name, namespace, "model", annotations=annotations),
            "spec": {
                "replicas": 1, "selector": {"matchLabels": _selector(name)},
                "template": {
                    "metadata": {"labels": _meta(name, namespace, "model")["labels"]},
                    "spec": {"terminationGracePeriodSeconds": grace, "containers": [container]},
                },
            },
        }  # fmt: skip
        return [deployment, _service(name, namespace, "model"),
                _service(name, namespace, "model", headless=True)]  # fmt: skip
    workers = len(model.rpc)
    leader_args = ["deploy", "entrypoint", "leader", "--rpc-port", str(RPC_PORT), "--",
                   *_serve_args(name, model)]  # fmt: skip
    leader = _container("leader", image, leader_args, res.to_k8s(margins.cpu), env, PORT, "http")
    leader |= _probes(model.startup_timeout)
    worker_args = ["deploy", "entrypoint", "worker", "--rpc-port", str(RPC_PORT)]
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    shares = worker_res or resources_none()
    worker = _container("worker", image, worker_args, shares.to_k8s(margins.cpu), [pod_ip],
                        RPC_PORT, "rpc")  # fmt: skip
    worker["readinessProbe"] = {"tcpSocket": {"port": "rpc"}, "periodSeconds": 5}
    labels = _meta(name, namespace, "model")["labels"]
    lws = {
        "apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
        "metadata": _meta(name, namespace, "model", annotations=annotations),
        "spec": {
            "replicas": 1, "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": 1 + workers, "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": {"metadata": {"labels": labels}, "spec": {
                    "terminationGracePeriodSeconds": grace, "containers": [leader]}},
                "workerTemplate": {"metadata": {"labels": labels}, "spec": {
                    "terminationGracePeriodSeconds": grace, "containers": [worker]}},
            },
        },
    }  # fmt: skip
    leaders = {f"{_LWS}/name": name, f"{_LWS}/worker-index": "0"}
    policy = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _meta(f"{name}-rpc", namespace, "model"),
        "spec": {
            "podSelector": {"matchExpressions": [
                {"key": f"{_LWS}/name", "operator": "In", "values": [name]},
                {"key": f"{_LWS}/worker-index", "operator": "NotIn", "values": ["0"]}]},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": leaders}}],
                         "ports": [{"protocol": "TCP", "port": RPC_PORT}]}],
        },
    }  # fmt: skip
    service = _service(name, namespace, "model", selector=leaders)
    return [lws, service, policy]


def router_config(config: Config, namespace: str) -> str:
    """The router's ``models.toml``: each model a ``[remote.NAME]`` served by its pods."""
    import tomli_w  # speed

    remote: dict[str, Any] = {}
    for name, model in config.models.items():
        remote[name] = {"replica_api_key_env": "LLAMACTL_REPLICA_KEY",
                        "aliases": list(model.aliases), "queue": model.queue}  # fmt: skip
        if model.rpc:  # one group: its leader, behind the model's Service
            remote[name]["replicas"] = [f"http://{name}.{namespace}.svc:{PORT}"]
        else:  # every ready pod, from the headless Service's records: prefix picking works
            host = f"{name}-pods.{namespace}.svc.cluster.local"
            remote[name]["discovery"] = {"kind": "dns", "name": host, "port": PORT}
    for name, section in config.remote.items():
        remote[name] = {"replicas": list(section.replicas), "pick": str(section.pick),
                        "aliases": list(section.aliases)}  # fmt: skip
        if section.replica_api_key_env:
            remote[name]["replica_api_key_env"] = "LLAMACTL_REPLICA_KEY"
    server = {"host": "0.0.0.0", "port": PORT}  # noqa: S104 - the pod's interface; keyed below
    return tomli_w.dumps({"server": server, "remote": remote})


def _router(config: Config, image: str, namespace: str, margins: Margins) -> list[dict[str, Any]]:
    name = "llamactl-router"
    memory = f"{margins.router_memory_bytes // _MIB}Mi"
    res = {"requests": {"cpu": "1", "memory": memory}, "limits": {"cpu": "1", "memory": memory}}
    env = [_secret_env("LLAMACTL_API_KEY", "api-key"),
           _secret_env("LLAMACTL_REPLICA_KEY", "replica-key")]  # fmt: skip
    args = ["serve", "--config", "/etc/llamactl/models.toml"]
    container = _container("router", image, args, res, env, PORT, "http") | _probes(30)
    container["volumeMounts"] = [{"name": "config", "mountPath": "/etc/llamactl"}]
    configmap = {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": _meta(name, namespace, "router"),
                 "data": {"models.toml": router_config(config, namespace)}}  # fmt: skip
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, namespace, "router"),
        "spec": {
            "replicas": 1, "selector": {"matchLabels": _selector(name)},
            "template": {
                "metadata": {"labels": _meta(name, namespace, "router")["labels"]},
                "spec": {"terminationGracePeriodSeconds": 5, "containers": [container],
                         "volumes": [{"name": "config", "configMap": {"name": name}}]},
            },
        },
    }  # fmt: skip
    return [configmap, deployment, _service(name, namespace, "router")]


def render(
    config: Config, *, image: str, namespace: str, estimates: dict[str, Estimate],
    margins: Margins | None = None,
) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """File stem -> its objects: ``router`` and one per model (``estimates`` by model)."""
    margins = margins or Margins()
    out = {"router": _router(config, image, namespace, margins)}
    for name, model in config.models.items():
        est, workers = estimates[name], len(model.rpc)
        res = resources(est, margins, workers=workers)
        worker_res = worker_resources(est, margins, workers) if workers else None
        out[name] = _model(name, model, image, namespace, res, margins, worker_res)
    return out


def _dumper() -> type:
    import yaml  # speed

    class Dumper(yaml.SafeDumper):
        """No anchors (``&id001``): each object reads on its own; config files as blocks."""

        def ignore_aliases(self, data: Any) -> bool:
            return True

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return Dumper


def write(rendered: dict[str, list[dict[str, Any]]], directory: Path) -> list[Path]:
    """One YAML file per stem (documents separated by ``---``); returns the files."""
    import yaml  # speed

    dumper = _dumper()
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for stem, objects in rendered.items():
        path = directory / f"{stem}.yaml"
        text = yaml.dump_all(objects, Dumper=dumper, sort_keys=False, default_flow_style=False)
        path.write_text(f"# rendered by `llamactl deploy k8s`; edit models.toml instead\n{text}")
        files.append(path)
    return files
