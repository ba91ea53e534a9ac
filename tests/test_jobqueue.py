"""The fair queue and the rate limiter."""

from __future__ import annotations

import asyncio

import pytest

from core.errors import Cancelled, QueueFull, RateLimited
from core.jobqueue import FairQueue, RateLimiter, Ticket


async def test_global_limit_and_positions() -> None:
    queue = FairQueue(global_limit=1, per_user_limit=1, max_waiting_per_user=5)
    first = Ticket("u:1", 1)
    await queue.acquire(first)
    seen: list[int] = []

    async def report(pos: int) -> None:
        seen.append(pos)

    second = Ticket("u:2", 2)
    third = Ticket("u:3", 3)
    t2 = asyncio.create_task(queue.acquire(second, report))
    t3 = asyncio.create_task(queue.acquire(third))
    await asyncio.sleep(0)
    assert queue.position(second) == 1 and queue.position(third) == 2
    queue.release(first)
    await t2
    assert not t3.done()
    assert queue.position(third) == 1
    queue.release(second)
    await t3
    assert seen == [1]
    assert queue.running == 1 and queue.waiting == 0


async def test_per_user_limit_does_not_block_others() -> None:
    queue = FairQueue(global_limit=2, per_user_limit=1, max_waiting_per_user=5)
    await queue.acquire(Ticket("u:1", 1))
    blocked = asyncio.create_task(queue.acquire(Ticket("u:1", 2)))
    other = asyncio.create_task(queue.acquire(Ticket("u:2", 3)))
    await asyncio.wait_for(other, 1)  # passes u:1's second job, which must wait for u:1's first
    await asyncio.sleep(0)
    assert not blocked.done()
    blocked.cancel()


async def test_cancel_waiting_job() -> None:
    queue = FairQueue(global_limit=1, per_user_limit=1, max_waiting_per_user=5)
    await queue.acquire(Ticket("u:1", 1))
    waiting = asyncio.create_task(queue.acquire(Ticket("u:2", 7)))
    await asyncio.sleep(0)
    assert queue.cancel("u:2") == [7]
    with pytest.raises(Cancelled):
        await waiting
    assert queue.waiting == 0


async def test_close_cancels_waiting_and_refuses_new() -> None:
    queue = FairQueue(global_limit=1, per_user_limit=1, max_waiting_per_user=5)
    await queue.acquire(Ticket("u:1", 1))
    waiting = asyncio.create_task(queue.acquire(Ticket("u:2", 2)))
    await asyncio.sleep(0)
    assert queue.close() == [2]
    with pytest.raises(Cancelled) as info:
        await waiting
    assert info.value.key == "job.shutting_down"
    with pytest.raises(Cancelled):
        queue.check_room("u:3")


async def test_queue_full_per_user() -> None:
    queue = FairQueue(global_limit=1, per_user_limit=1, max_waiting_per_user=1)
    await queue.acquire(Ticket("u:0", 0))
    task = asyncio.create_task(queue.acquire(Ticket("u:1", 1)))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        queue.check_room("u:1")
    queue.check_room("u:2")
    task.cancel()


async def test_task_cancelled_while_waiting_leaves_no_trace() -> None:
    queue = FairQueue(global_limit=1, per_user_limit=1, max_waiting_per_user=5)
    first = Ticket("u:1", 1)
    await queue.acquire(first)
    task = asyncio.create_task(queue.acquire(Ticket("u:2", 2)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert queue.waiting == 0
    queue.release(first)
    assert queue.running == 0


def test_rate_limiter_window() -> None:
    now = [1000.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    limiter.hit("u:1")
    limiter.hit("u:1")
    with pytest.raises(RateLimited) as info:
        limiter.hit("u:1")
    assert info.value.params["seconds"] == 60
    limiter.hit("u:2")  # other users are not affected
    now[0] += 60
    limiter.hit("u:1")


def test_rate_limiter_off() -> None:
    limiter = RateLimiter(0)
    for _ in range(100):
        limiter.hit("u:1")
