"""The restart policy decides with plain numbers: no process, no clock."""

from __future__ import annotations

import signal

import pytest

from procman.errors import ConfigError
from procman.process.policy import Action, RestartPolicy, is_crash
from procman.spec import RestartSettings


def policy(**settings: float) -> RestartPolicy:
    return RestartPolicy(RestartSettings(**settings))  # type: ignore[arg-type]


def test_backoff_doubles_up_to_the_cap() -> None:
    p = policy(max_restarts=10, window=1000, backoff_initial=0.5, backoff_factor=2, backoff_max=3)
    delays = [p.on_crash(float(t), "exit").delay for t in range(6)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_gives_up_after_too_many_crashes_in_the_window() -> None:
    p = policy(max_restarts=3, window=60)
    decisions = [p.on_crash(t, "exit status 1") for t in (0.0, 1.0, 2.0, 3.0)]
    assert [d.action for d in decisions] == [Action.RESTART] * 3 + [Action.GIVE_UP]
    assert decisions[-1].attempt == 4
    assert "exit status 1" in decisions[-1].reason
    assert "failed" in decisions[-1].reason
    assert decisions[-1].delay == 60.0  # the cooldown before a request may start it again


def test_crashes_older_than_the_window_are_forgotten() -> None:
    p = policy(max_restarts=2, window=10, backoff_initial=1)
    assert p.on_crash(0.0, "x").action is Action.RESTART
    assert p.on_crash(5.0, "x").action is Action.RESTART
    # the crash at 0 has left the window: two in the window, not three
    later = p.on_crash(12.0, "x")
    assert later.action is Action.RESTART
    assert later.attempt == 2
    assert later.delay == 2.0


def test_a_long_healthy_run_resets_the_backoff() -> None:
    p = policy(max_restarts=5, window=30, backoff_initial=1)
    for t in (0.0, 1.0, 2.0):
        p.on_crash(t, "x")
    p.on_ready(100.0)
    assert p.recent_crashes == 0
    assert p.on_crash(101.0, "x").delay == 1.0


def test_an_end_that_is_no_crash_is_restarted_but_never_counted() -> None:
    p = policy(max_restarts=2, window=60, backoff_initial=1, backoff_max=8)
    ends = [p.on_crash(float(t), "SIGTERM", crash=False) for t in range(10)]
    assert {d.action for d in ends} == {Action.RESTART}
    assert [d.delay for d in ends[:5]] == [1, 2, 4, 8, 8], "never faster than the backoff"
    assert p.recent_crashes == 0
    assert p.on_crash(10.0, "SIGSEGV").action is Action.RESTART  # one real crash of two


@pytest.mark.parametrize(
    ("code", "crash"),
    [(0, False), (1, True), (-signal.SIGTERM, False), (-signal.SIGINT, False),
     (-signal.SIGHUP, False), (-signal.SIGKILL, True), (-signal.SIGSEGV, True),
     (-signal.SIGABRT, True)],
)  # fmt: skip
def test_what_counts_as_a_crash(code: int, crash: bool) -> None:
    assert is_crash(code) is crash


def test_a_cooldown_of_zero_and_of_an_hour() -> None:
    assert policy(max_restarts=0, cooldown=0).on_crash(0.0, "x").delay == 0
    assert policy(max_restarts=0, cooldown=3600).on_crash(0.0, "x").delay == 3600


def test_zero_restarts_means_fail_at_the_first_crash() -> None:
    assert policy(max_restarts=0).on_crash(0.0, "boom").action is Action.GIVE_UP


def test_reset_clears_history() -> None:
    p = policy(max_restarts=1)
    p.on_crash(0.0, "x")
    p.reset()
    assert p.on_crash(0.1, "x").action is Action.RESTART


@pytest.mark.parametrize(
    "settings",
    [{"max_restarts": -1}, {"window": 0}, {"backoff_factor": 0.5}, {"backoff_max": 0.1}],
)
def test_invalid_settings_are_config_errors(settings: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        RestartSettings(**settings)  # type: ignore[arg-type]
