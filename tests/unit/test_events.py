"""Events reach callbacks and async listeners; broken or slow listeners cannot hurt."""

from __future__ import annotations

import asyncio

from procman.events import Event, EventBus, State


def test_callbacks_get_events_until_unsubscribed() -> None:
    bus = EventBus()
    seen: list[Event] = []
    unsubscribe = bus.subscribe(seen.append)
    first = bus.emit("demo", State.STARTING, State.STOPPED, "spawned", pid=7, port=9)
    unsubscribe()
    bus.emit("demo", State.READY, State.STARTING, "ready")
    assert seen == [first]
    assert first.pid == 7
    assert first.time > 0
    assert first.to_json()["state"] == "starting"
    assert len(bus.history) == 2


def test_a_raising_callback_does_not_stop_the_others() -> None:
    bus = EventBus()
    seen: list[State] = []

    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    bus.subscribe(broken)
    bus.subscribe(lambda e: seen.append(e.state))
    bus.emit("demo", State.READY, State.LOADING, "ok")
    assert seen == [State.READY]


async def test_async_listener_receives_in_order_and_stops_on_close() -> None:
    bus = EventBus()
    got: list[State] = []

    async def consume() -> None:
        async with bus.listen() as events:
            async for event in events:
                got.append(event.state)
                if event.state is State.READY:
                    return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    for state in (State.STARTING, State.LOADING, State.READY):
        bus.emit("demo", state, State.STOPPED, "")
    await asyncio.wait_for(task, 2)
    assert got == [State.STARTING, State.LOADING, State.READY]
    assert not bus._subscriptions


async def test_slow_listener_drops_oldest() -> None:
    bus = EventBus()
    events = bus.listen(maxsize=2)
    for state in (State.STARTING, State.LOADING, State.READY):
        bus.emit("demo", state, State.STOPPED, "")
    assert [(await anext(events)).state for _ in range(2)] == [State.LOADING, State.READY]
    events.close()
    assert [e async for e in events] == []


def test_final_states() -> None:
    assert State.FAILED.is_final
    assert State.STOPPED.is_final
    assert not State.RESTARTING.is_final
