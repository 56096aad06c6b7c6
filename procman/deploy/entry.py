"""Container entrypoints: the same ``llamactl`` commands on a laptop and in a pod.

A LeaderWorkerSet tells its pods where they are through environment variables
(``LWS_LEADER_ADDRESS``: the leader's DNS name, ``<set>-<group>.<service>.<ns>``;
``LWS_GROUP_SIZE``; ``LWS_WORKER_INDEX``), and the downward API gives a pod its
own IP (``POD_IP``). From these:

* the worker listens on its pod's IP (``llamactl worker --allow-network``);
* the leader derives its workers' names (``<set>-<group>-<i>.<service>.<ns>``,
  i = 1 .. size - 1), waits until each resolves and accepts a connection (the
  leader aborts on an unreachable worker, so it must not start before them),
  then runs ``llamactl serve ... --rpc IP:PORT,... --trusted-network``.

``LLAMACTL_RPC_WORKERS=HOST:PORT,...`` gives the workers directly, where pod
names do not resolve (a run on one machine).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping, Sequence

from procman.errors import ConfigError

__all__ = ["leader_argv", "wait_for_workers", "worker_argv", "worker_names"]


def _size(env: Mapping[str, str]) -> int:
    text = env.get("LWS_GROUP_SIZE", "")
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(
            f"LWS_GROUP_SIZE is {text!r}, not a group size",
            hint="LeaderWorkerSet sets it in its pods; on one machine set LLAMACTL_RPC_WORKERS",
        )
    return int(text)


def worker_names(env: Mapping[str, str], port: int) -> list[str]:
    """The workers' ``HOST:PORT``, from ``LLAMACTL_RPC_WORKERS`` or the LWS environment."""
    given = env.get("LLAMACTL_RPC_WORKERS")
    if given:
        return [w.strip() for w in given.split(",") if w.strip()]
    leader = env.get("LWS_LEADER_ADDRESS", "")
    first, dot, rest = leader.partition(".")
    if not first or not dot:
        raise ConfigError(
            f"LWS_LEADER_ADDRESS is {leader!r}, not a pod's DNS name",
            hint="LeaderWorkerSet sets it in its pods; on one machine set "
            "LLAMACTL_RPC_WORKERS=HOST:PORT,...",
        )
    return [f"{first}-{i}.{rest}:{port}" for i in range(1, _size(env))]


def _resolve(name: str) -> str:
    """An IPv4 address for ``name`` (llama-server's --rpc and the probe take IPv4)."""
    infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    return str(infos[0][4][0])


def _accepts(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_workers(
    names: Sequence[str],
    timeout: float,
    *,
    resolve: Callable[[str], str] = _resolve,
    accepts: Callable[[str, int, float], bool] = _accepts,
    clock: Callable[[], float] = time.monotonic,
    pause: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Each worker as ``IP:PORT`` once it resolves and accepts; raises ConfigError naming
    those still missing after ``timeout`` seconds."""
    deadline = clock() + timeout
    found: dict[str, str] = {}
    while True:
        for name in names:
            if name in found:
                continue
            host, _, port = name.rpartition(":")
            try:
                address = resolve(host)
            except OSError:
                continue
            if accepts(address, int(port), 2.0):
                found[name] = f"{address}:{port}"
        if len(found) == len(names):
            return [found[n] for n in names]
        if clock() >= deadline:
            missing = ", ".join(n for n in names if n not in found)
            raise ConfigError(
                f"RPC workers not reachable after {timeout:g} s: {missing}",
                hint="are the worker pods running (kubectl get pods -l "
                "leaderworkerset.sigs.k8s.io/name=...)?",
            )
        pause(0.5)  # DNS records and the port appear when the pods start: nothing to await


def leader_argv(serve: Sequence[str], workers: Sequence[str]) -> list[str]:
    """``llamactl`` arguments for the leader: ``serve`` with the workers found."""
    return [*serve, "--rpc", ",".join(workers), "--trusted-network"]


def worker_argv(env: Mapping[str, str], port: int) -> list[str]:
    """``llamactl`` arguments for a worker: on the pod's IP (downward API), else all
    interfaces of the pod."""
    host = env.get("POD_IP") or "0.0.0.0"  # noqa: S104 - a pod's own network namespace
    return ["worker", "--host", host, "--port", str(port), "--allow-network"]
