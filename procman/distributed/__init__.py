"""Past one machine, on engines that exist: llama.cpp's RPC workers.

llama.cpp's RPC backend carries the tensors; llamactl supervises the
processes, probes the workers, plans the split and restarts the group:

* :mod:`~procman.distributed.rpc`: worker endpoints, and a probe speaking the
  first commands of ggml's RPC protocol (version, devices, free memory);
* :mod:`~procman.distributed.worker`: :class:`ManagedWorker`, one supervised
  ``ggml-rpc-server`` (``llamactl worker``);
* :mod:`~procman.distributed.status`: the worker's read-only status endpoint;
* :mod:`~procman.distributed.group`: a server and its workers as one group (may it
  start, a lost worker is not a crash, the stall watchdog), which
  :class:`procman.process.ManagedServer` consults when ``ServerSpec.rpc`` is set.
"""

from __future__ import annotations

from procman._lazy import exports

TYPE_CHECKING = False
if TYPE_CHECKING:
    from procman.distributed.rpc import WorkerProbe, parse_endpoints, probe, probe_all
    from procman.distributed.worker import ManagedWorker, WorkerSpec

__all__ = ["ManagedWorker", "WorkerProbe", "WorkerSpec", "parse_endpoints", "probe", "probe_all"]

__getattr__, __dir__ = exports(
    __name__,
    {
        **dict.fromkeys(
            ("WorkerProbe", "parse_endpoints", "probe", "probe_all"), "procman.distributed.rpc"
        ),
        **dict.fromkeys(("ManagedWorker", "WorkerSpec"), "procman.distributed.worker"),
    },
)
