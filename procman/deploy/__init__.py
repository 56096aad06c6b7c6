"""Past one machine, with Kubernetes doing the placing: manifests, checks, pod entrypoints.

* :mod:`~procman.deploy.k8s`: ``models.toml`` -> Deployments, Services, a
  LeaderWorkerSet and NetworkPolicy per RPC model (``llamactl deploy k8s``);
* :mod:`~procman.deploy.check`: the manifests validated offline against the
  official schemas (``llamactl deploy k8s --check``);
* :mod:`~procman.deploy.entry`: what a pod runs, from the LeaderWorkerSet
  environment (``llamactl deploy entrypoint``).
"""

from __future__ import annotations

from procman._lazy import exports

TYPE_CHECKING = False
if TYPE_CHECKING:
    from procman.deploy.check import check_dir
    from procman.deploy.k8s import Margins, render, write

__all__ = ["Margins", "check_dir", "render", "write"]

__getattr__, __dir__ = exports(
    __name__,
    {
        "check_dir": "procman.deploy.check",
        **dict.fromkeys(("Margins", "render", "write"), "procman.deploy.k8s"),
    },
)
