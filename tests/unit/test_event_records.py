"""Every kind of event as a JSON log line: ``serve --log-format json`` and ``/admin/events``."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from datetime import datetime

import pytest

from procman.cli._logfmt import LogFormat, Output, message_record
from procman.events import EVENT_KINDS, Event, EventBus, State
from procman.router._logs import Journal

FIELDS = {"time", "level", "event", "model", "state", "previous", "reason", "pid", "port"}

#: one event of each kind, as the supervisor and its servers emit them
EXAMPLES: list[tuple[State, State, str]] = [
    (State.STARTING, State.STOPPED, ""),
    (State.LOADING, State.STARTING, ""),
    (State.READY, State.LOADING, ""),
    (State.UNHEALTHY, State.READY, ""),
    (State.READY, State.UNHEALTHY, ""),
    (State.RESTARTING, State.READY, ""),
    (State.FAILED, State.RESTARTING, ""),
    (State.STOPPING, State.READY, ""),
    (State.STOPPED, State.STOPPING, ""),
    (State.STOPPED, State.STOPPED, "admitted"),
    (State.STOPPED, State.STOPPED, "refused"),
    (State.READY, State.READY, "evicted"),
    (State.READY, State.READY, "reload"),
    (State.READY, State.READY, ""),
]


def events() -> list[Event]:
    bus = EventBus()
    return [
        bus.emit("chat", state, previous, f"why {i}", pid=100 + i, port=None, kind=kind)
        for i, (state, previous, kind) in enumerate(EXAMPLES)
    ]


def test_every_kind_has_an_example_and_a_level() -> None:
    assert sorted({e.event for e in events()}) == sorted(EVENT_KINDS)
    assert [e.is_note for e in events()] == [False] * 9 + [True] * 5
    assert set(EVENT_KINDS.values()) <= {"info", "warning", "error"}


@pytest.fixture
def json_output(capsys: pytest.CaptureFixture[str]) -> Iterator[Output]:
    output = Output()
    output.configure(LogFormat.JSON)
    yield output


def test_json_lines_parse_and_carry_the_fields_for_every_kind(
    json_output: Output, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = Journal()
    json_output.attach(journal)
    emitted = events()
    for event in emitted:
        json_output.event(event)
    lines = capsys.readouterr().err.splitlines()
    assert lines == journal.tail(100)  # the router serves the same lines
    records = [json.loads(line) for line in lines]
    for event, record in zip(emitted, records, strict=True):
        assert set(record) >= FIELDS
        assert record["event"] == event.event and record["level"] == EVENT_KINDS[event.event]
        assert record["model"] == "chat" and record["state"] == str(event.state)
        assert record["pid"] == event.pid and record["reason"] == event.reason
        assert datetime.fromisoformat(record["time"]).timestamp() == pytest.approx(
            event.time, abs=1e-3
        )
    assert {r["event"] for r in records} == set(EVENT_KINDS)
    crash = next(r for r in records if r["event"] == "crash")
    assert crash["level"] == "warning" and crash["previous"] == "ready"


def test_other_messages_and_python_logging_share_the_shape(
    json_output: Output, capsys: pytest.CaptureFixture[str]
) -> None:
    json_output.say("serving", "[bold]serving[/] a at http://127.0.0.1:1/v1")
    handler = logging.StreamHandler()  # what basicConfig installs, formatted by configure
    logging.getLogger().addHandler(handler)
    try:
        json_output.configure(LogFormat.JSON)
        logging.getLogger("procman.test").warning("a %s warning", "library")
    finally:
        logging.getLogger().removeHandler(handler)
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["event"] == "serving" and first["reason"] == "serving a at http://127.0.0.1:1/v1"
    assert first["model"] is None and set(first) >= FIELDS
    assert second["event"] == "log" and second["level"] == "warning"
    assert second["reason"] == "a library warning" and second["logger"] == "procman.test"
    assert set(message_record("x", "y")) >= FIELDS


def test_text_lines_name_the_kind_of_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    output = Output()
    journal = Journal()
    output.say("early", "before the router existed")
    output.attach(journal)
    admitted = events()[9]
    output.event(admitted)
    assert journal.tail(5)[0] == "before the router existed"
    assert journal.tail(5)[1].endswith("chat admitted why 9")


async def test_a_journal_follower_gets_the_tail_then_new_lines() -> None:
    journal = Journal(keep=3)
    for n in range(5):
        journal.write(f"line {n}")
    assert journal.tail(10) == ["line 2", "line 3", "line 4"]
    got: list[str] = []

    async def follow() -> None:
        async for line in journal.follow(2):
            got.append(line)
            if line == "line 5":
                return

    task = asyncio.create_task(follow())
    await asyncio.sleep(0)
    journal.write("line 5")
    await asyncio.wait_for(task, 5)
    assert got == ["line 3", "line 4", "line 5"]
