"""A stopping service ends its loops even when a client library swallows a cancellation."""

from __future__ import annotations

import asyncio

from tokenmill import service


async def test_a_loop_that_swallows_its_first_cancellation_is_cancelled_again() -> None:
    cancellations = 0

    async def swallowing_loop() -> None:
        nonlocal cancellations
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancellations += 1
                if cancellations == 1:
                    # What redis-py does mid-command: the cancellation becomes another error,
                    # which the loop waits out as an outage and then reads on.
                    asyncio.current_task().uncancel()
                    continue
                raise

    task = asyncio.create_task(swallowing_loop(), name="swallower")
    await asyncio.sleep(0)
    await asyncio.wait_for(service.stop_loops([task]), timeout=5)
    assert task.cancelled()
    assert cancellations == 2


async def test_loops_that_stop_at_once_are_cancelled_once() -> None:
    cancellations = 0

    async def polite_loop() -> None:
        nonlocal cancellations
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancellations += 1
            raise

    tasks = [asyncio.create_task(polite_loop()) for _ in range(3)]
    await asyncio.sleep(0)
    await service.stop_loops(tasks)
    assert all(task.cancelled() for task in tasks)
    assert cancellations == 3
