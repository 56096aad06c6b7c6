"""Budgets and admission with plain numbers: no process, no real machine."""

from __future__ import annotations

import pytest

from procman._units import format_bytes
from procman.errors import AdmissionError, ConfigError
from procman.memory.budget import (
    HOST_MARGIN_MIN,
    Budget,
    Decision,
    Ledger,
    MachineMemory,
    Need,
    OverBudget,
    Resident,
    Verdict,
    decide,
    resolve_budget,
)
from procman.memory.estimate import MiB, estimate
from tests.unit.test_estimate import SMOLLM2

GiB = 1024 * MiB
MACHINE = MachineMemory(
    total_bytes=64 * GiB,
    available_bytes=40 * GiB,
    vram_total_bytes=80 * GiB,
    vram_free_bytes=79 * GiB,
)


def resident(
    name: str, host: int, *, used: float = 0.0, busy: bool = False, dev: int = 0
) -> Resident:
    return Resident(name=name, host_bytes=host, device_bytes=dev, last_used=used, busy=busy)


def test_budget_sizes_are_read_once_with_the_config_units() -> None:
    assert resolve_budget("512MiB", 2 * GiB, MACHINE).memory_bytes == 512 * MiB
    with pytest.raises(ConfigError, match="memory_budget"):
        resolve_budget("lots", None, MACHINE)


def test_auto_budget_keeps_a_margin() -> None:
    budget = resolve_budget("auto", "auto", MACHINE)
    assert budget.memory_bytes == 40 * GiB - int(64 * GiB * 0.10)
    assert budget.vram_bytes == 79 * GiB - 4 * GiB  # 5% of 80 GiB
    assert "available" in budget.memory_reason and "margin" in budget.vram_reason


def test_auto_budget_small_machine_uses_minimum_margins() -> None:
    small = MachineMemory(total_bytes=4 * GiB, available_bytes=3 * GiB)
    budget = resolve_budget("auto", "auto", small)
    assert budget.memory_bytes == 3 * GiB - HOST_MARGIN_MIN
    assert budget.vram_bytes == 0 and "no GPU" in budget.vram_reason


def test_explicit_and_unlimited_budgets() -> None:
    budget = resolve_budget("12GiB", None, MACHINE)
    assert budget.memory_bytes == 12 * GiB and budget.vram_bytes is None


def test_need_includes_growth_and_checks_the_model_limit() -> None:
    est = estimate(SMOLLM2, ctx=2048, cache_ram=64 * MiB)
    need = Need.of(est)
    assert need.host_bytes == est.host_bytes + 64 * MiB
    with pytest.raises(OverBudget, match="memory_limit") as info:
        Need.of(est, memory_limit=50 * MiB)
    assert info.value.needed == need.host_bytes and info.value.budget == 50 * MiB


def test_admit_when_it_fits() -> None:
    budget = Budget(memory_bytes=10 * GiB, vram_bytes=None)
    decision = decide("c", Need(host_bytes=2 * GiB, device_bytes=5 * GiB), [], budget)
    assert decision == Decision(verdict=Verdict.ADMIT, reason="c fits the budget")


def test_evicts_least_recently_used_idle_servers_first() -> None:
    budget = Budget(memory_bytes=10 * GiB, vram_bytes=None)
    residents = [
        resident("busy-old", 3 * GiB, used=1, busy=True),
        resident("idle-new", 3 * GiB, used=30),
        resident("idle-old", 3 * GiB, used=10),
    ]
    decision = decide("c", Need(host_bytes=3 * GiB, device_bytes=0), residents, budget)
    assert decision.verdict is Verdict.EVICT
    assert decision.evict == ("idle-old",)
    decision = decide("c", Need(host_bytes=6 * GiB, device_bytes=0), residents, budget)
    assert decision.evict == ("idle-old", "idle-new")


def test_refuses_with_the_numbers_when_busy_servers_hold_the_memory() -> None:
    budget = Budget(memory_bytes=10 * GiB, vram_bytes=None)
    residents = [resident("a", 6 * GiB, busy=True), resident("b", 1 * GiB)]
    decision = decide("c", Need(host_bytes=5 * GiB, device_bytes=0), residents, budget)
    assert decision.verdict is Verdict.REFUSE
    error = decision.error
    assert isinstance(error, AdmissionError) and isinstance(error, OverBudget)
    assert (error.resource, error.needed, error.free, error.budget) == (
        "memory",
        5 * GiB,
        4 * GiB,
        10 * GiB,
    )
    assert str(error) == (
        "model 'c' needs 5.0 GiB of memory, 4.0 GiB is free of a 10 GiB budget "
        "(6.0 GiB held by busy servers)"
    )
    assert error.hint is not None and "memory_budget" in error.hint


def test_vram_is_checked_separately() -> None:
    budget = Budget(memory_bytes=None, vram_bytes=4 * GiB)
    residents = [resident("gpu", 0, dev=3 * GiB)]
    decision = decide("c", Need(host_bytes=100 * GiB, device_bytes=2 * GiB), residents, budget)
    assert decision.verdict is Verdict.EVICT and decision.evict == ("gpu",)
    decision = decide("c", Need(host_bytes=0, device_bytes=5 * GiB), [], budget)
    assert decision.error is not None and decision.error.resource == "vram"


class Clock:
    def __init__(self) -> None:
        self.activity: dict[str, tuple[float, bool]] = {}

    def __call__(self, name: str) -> tuple[float, bool]:
        return self.activity.get(name, (0.0, False))


def test_concurrent_reservations_cannot_over_commit() -> None:
    activity = Clock()
    ledger = Ledger(Budget(memory_bytes=10 * GiB, vram_bytes=None), activity)
    first = ledger.reserve("a", Need(host_bytes=6 * GiB, device_bytes=0))
    activity.activity["a"] = (0.0, True)  # still loading
    with pytest.raises(OverBudget):
        ledger.reserve("b", Need(host_bytes=6 * GiB, device_bytes=0))
    assert ledger.stats.refusals == 1
    first.release()
    ledger.reserve("b", Need(host_bytes=6 * GiB, device_bytes=0))
    assert set(ledger.held()) == {"b"}


def test_an_evictee_is_claimed_by_one_reservation_only() -> None:
    ledger = Ledger(Budget(memory_bytes=10 * GiB, vram_bytes=None), Clock())
    ledger.reserve("old", Need(host_bytes=8 * GiB, device_bytes=0))
    r = ledger.reserve("new", Need(host_bytes=8 * GiB, device_bytes=0))
    assert r.evict == ("old",)
    with pytest.raises(OverBudget):  # "old" is already leaving, "new" is still loading
        ledger.reserve("third", Need(host_bytes=8 * GiB, device_bytes=0))
    ledger.release("old")  # the caller stopped it
    assert ledger.held() == {"new": (8 * GiB, 0)}
    assert (ledger.stats.admissions, ledger.stats.evictions) == (2, 1)


def test_reservation_released_when_start_fails() -> None:
    ledger = Ledger(Budget(memory_bytes=10 * GiB, vram_bytes=None), Clock())
    with (
        pytest.raises(RuntimeError),
        ledger.reserve("a", Need(host_bytes=1 * GiB, device_bytes=0)),
    ):
        raise RuntimeError("llama-server did not start")
    assert ledger.held() == {}
    with ledger.reserve("a", Need(host_bytes=1 * GiB, device_bytes=0)):
        pass
    assert "a" in ledger.held()


def test_measurement_above_the_estimate_is_counted_below_is_not() -> None:
    ledger = Ledger(Budget(memory_bytes=10 * GiB, vram_bytes=None), Clock())
    ledger.reserve("a", Need(host_bytes=1 * GiB, device_bytes=0))
    ledger.measure("a", 512 * MiB)
    assert ledger.held()["a"] == (1 * GiB, 0)
    ledger.measure("a", 2 * GiB, 3 * GiB)
    assert ledger.held()["a"] == (2 * GiB, 3 * GiB)
    ledger.measure("unknown", 1)  # a server that was released meanwhile


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (212 * MiB, 7 * GiB + GiB // 2, 80 * GiB)] == [
        "212 MiB",
        "7.5 GiB",
        "80 GiB",
    ]
