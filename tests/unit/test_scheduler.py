"""The per-model queue: slots, bounds, FIFO/LIFO order, cancellation. Pure asyncio."""

from __future__ import annotations

import asyncio

import pytest

from procman.config import Order
from procman.router.scheduler import (
    ModelQueue,
    QueueClosedError,
    QueueFullError,
    QueueSettings,
    Scheduler,
)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def served_in_order(order: Order, waiting: int = 3) -> list[int]:
    queue = ModelQueue("m", QueueSettings(slots=1, maxsize=8, order=order))
    served: list[int] = []
    await queue.acquire()  # the slot is busy: everyone else waits

    async def request(number: int) -> None:
        async with queue.slot():
            served.append(number)
            await asyncio.sleep(0)

    tasks = []
    for number in range(waiting):
        tasks.append(asyncio.create_task(request(number)))
        await settle()  # arrival order is the creation order
    assert queue.waiting == waiting
    queue.release()
    await asyncio.gather(*tasks)
    assert queue.active == 0 and queue.waiting == 0
    return served


async def test_fifo_serves_the_oldest_first() -> None:
    assert await served_in_order(Order.FIFO) == [0, 1, 2]


async def test_lifo_serves_the_newest_first() -> None:
    assert await served_in_order(Order.LIFO) == [2, 1, 0]


async def test_slots_bound_concurrency() -> None:
    queue = ModelQueue("m", QueueSettings(slots=2, maxsize=10))
    running = peak = 0

    async def request() -> None:
        nonlocal running, peak
        async with queue.slot():
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1

    await asyncio.gather(*(request() for _ in range(6)))
    assert peak == 2 and queue.active == 0


async def test_a_full_queue_refuses_at_once() -> None:
    queue = ModelQueue("m", QueueSettings(slots=1, maxsize=2))
    await queue.acquire()
    waiters = [asyncio.create_task(queue.acquire()) for _ in range(2)]
    await settle()
    with pytest.raises(QueueFullError) as caught:
        await queue.acquire()
    assert caught.value.maxsize == 2 and "queue" in (caught.value.hint or "")
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_zero_queue_means_no_waiting() -> None:
    queue = ModelQueue("m", QueueSettings(slots=1, maxsize=0))
    async with queue.slot():
        with pytest.raises(QueueFullError):
            await queue.acquire()


async def test_a_cancelled_waiter_leaves_the_line() -> None:
    queue = ModelQueue("m", QueueSettings(slots=1, maxsize=1))
    await queue.acquire()
    gone = asyncio.create_task(queue.acquire())
    await settle()
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert queue.waiting == 0
    stays = asyncio.create_task(queue.acquire())  # its place is free again
    await settle()
    queue.release()
    await asyncio.wait_for(stays, 1)
    assert queue.active == 1


async def test_a_slot_granted_to_a_cancelled_waiter_passes_on() -> None:
    queue = ModelQueue("m", QueueSettings(slots=1, maxsize=4))
    await queue.acquire()
    first = asyncio.create_task(queue.acquire())
    second = asyncio.create_task(queue.acquire())
    await settle()
    queue.release()  # grants `first` its slot...
    first.cancel()  # ...which is cancelled before it runs
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1)
    assert queue.active == 1 and queue.waiting == 0


async def test_a_waiter_cancelled_just_before_a_release_is_skipped_cleanly() -> None:
    queue = ModelQueue("m", QueueSettings(slots=1, maxsize=4))
    await queue.acquire()
    first = asyncio.create_task(queue.acquire())
    second = asyncio.create_task(queue.acquire())
    await settle()
    assert queue.waiting == 2
    first.cancel()  # its future is cancelled now, its task learns it on its next step...
    queue.release()  # ...after this release has popped and skipped it
    results = await asyncio.gather(first, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)  # not a ValueError from the deque
    await asyncio.wait_for(second, 1)
    assert queue.active == 1 and queue.waiting == 0


async def test_cancelling_inside_the_slot_frees_it() -> None:
    queue = ModelQueue("m", QueueSettings(slots=1, maxsize=4))
    holding = asyncio.Event()

    async def long_request() -> None:
        async with queue.slot():
            holding.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(long_request())
    await holding.wait()
    task.cancel()  # the client went away mid-answer
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.wait_for(queue.acquire(), 1)


def test_scheduler_knows_queues_by_name() -> None:
    scheduler = Scheduler({"a": QueueSettings(slots=2)})
    scheduler.add("b", QueueSettings(order=Order.LIFO))
    assert scheduler.queue("c") is None
    assert scheduler.snapshot()["b"] == {
        "active": 0, "waiting": 0, "slots": 1, "queue": 64, "order": "lifo",
    }  # fmt: skip
    with pytest.raises(ValueError, match="slots"):
        QueueSettings(slots=0)


# -- what a config reload does to a queue --------------------------------------------------------
async def test_a_held_queue_lets_nothing_through_until_resumed() -> None:
    queue = ModelQueue("m", QueueSettings(slots=2, maxsize=8))
    await queue.acquire()
    queue.hold()
    late = asyncio.create_task(queue.acquire())  # a slot is free, but the queue is held
    await settle()
    assert not late.done() and queue.waiting == 1
    drained = asyncio.create_task(queue.drained(timeout=30))
    await settle()
    assert not drained.done()  # the request in flight still runs
    queue.release()
    assert await drained is True
    assert not late.done()
    queue.resume()
    await late
    assert queue.active == 1 and queue.waiting == 0


async def test_drained_gives_up_after_its_timeout() -> None:
    queue = ModelQueue("m", QueueSettings(slots=1))
    await queue.acquire()
    assert await queue.drained(timeout=0.01) is False
    assert queue.active == 1
    assert await ModelQueue("idle").drained(timeout=0) is True


async def test_a_closed_queue_answers_its_line_and_refuses_newcomers() -> None:
    queue = ModelQueue("m", QueueSettings(slots=1, maxsize=8))
    await queue.acquire()
    waiters = [asyncio.create_task(queue.acquire()) for _ in range(3)]
    await settle()
    queue.close("removed by a reload")
    for waiter in waiters:
        with pytest.raises(QueueClosedError, match="'m' is no longer served: removed by a reload"):
            await waiter
    assert queue.waiting == 0 and queue.active == 1  # the one in flight goes on
    with pytest.raises(QueueClosedError):
        await queue.acquire()
    queue.release()
    assert queue.active == 0


async def test_update_takes_new_slots_and_order_keeping_the_line() -> None:
    queue = ModelQueue("m", QueueSettings(slots=1, maxsize=8))
    await queue.acquire()
    waiters = [asyncio.create_task(queue.acquire()) for _ in range(3)]
    await settle()
    queue.update(QueueSettings(slots=3, maxsize=8, order=Order.LIFO))
    await settle()
    assert sum(w.done() for w in waiters) == 2 and queue.active == 3
    assert queue.snapshot()["order"] == "lifo"
    queue.release()
    await asyncio.gather(*waiters)
    scheduler = Scheduler()
    scheduler.add("m", QueueSettings())
    scheduler.remove("m")
    assert scheduler.queue("m") is None
