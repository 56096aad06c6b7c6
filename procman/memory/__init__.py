"""Memory: how much a model will need, what the machine can give, and who holds what.

The flow at each start: :mod:`~procman.memory.estimate` predicts a model's
host and device bytes from its GGUF header; :mod:`~procman.memory.gpu_layers`
picks ``-ngl`` from that and the free VRAM; :mod:`~procman.memory.budget`
decides against the budget and the ledger of what running servers hold (and
whom to evict). While a server runs, :mod:`~procman.memory.meter` samples its
RSS, CPU, VRAM and tokens/s, and :mod:`~procman.memory.enforce` turns a breach
of its limit into a restart or a stop (or lets the kernel's cgroup enforce it).
``_limits`` wires the five together for the supervisor.
"""

from __future__ import annotations

from procman._lazy import exports

TYPE_CHECKING = False
if TYPE_CHECKING:
    from procman.memory.budget import (
        Budget,
        Ledger,
        MachineMemory,
        Need,
        OverBudget,
        Reservation,
        Size,
        probe_machine,
        resolve_budget,
    )
    from procman.memory.enforce import LimitAction, LimitDecision, LimitSettings, MemoryLimit
    from procman.memory.estimate import Estimate, estimate
    from procman.memory.gpu_layers import LayerChoice, choose_gpu_layers
    from procman.memory.meter import LlamaMetrics, Meter, Sample

__all__ = [
    "Budget", "Estimate", "LayerChoice", "Ledger", "LimitAction", "LimitDecision",
    "LimitSettings", "LlamaMetrics", "MachineMemory", "MemoryLimit", "Meter", "Need",
    "OverBudget", "Reservation", "Sample", "Size", "choose_gpu_layers", "estimate",
    "probe_machine", "resolve_budget",
]  # fmt: skip

__getattr__, __dir__ = exports(
    __name__,
    {
        **dict.fromkeys(
            (
                "Budget",
                "Ledger",
                "MachineMemory",
                "Need",
                "OverBudget",
                "Reservation",
                "Size",
                "probe_machine",
                "resolve_budget",
            ),
            "procman.memory.budget",
        ),
        **dict.fromkeys(
            ("LimitAction", "LimitDecision", "LimitSettings", "MemoryLimit"),
            "procman.memory.enforce",
        ),
        **dict.fromkeys(("Estimate", "estimate"), "procman.memory.estimate"),
        **dict.fromkeys(("LayerChoice", "choose_gpu_layers"), "procman.memory.gpu_layers"),
        **dict.fromkeys(("LlamaMetrics", "Meter", "Sample"), "procman.memory.meter"),
    },
)
