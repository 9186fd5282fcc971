"""router.proxy.deadlines: asyncio.timeout's semantics on one periodic sweep."""

from __future__ import annotations

import asyncio
import time

import pytest

from router.proxy.deadlines import Deadlines

TICK = 0.01


async def test_a_block_past_its_deadline_times_out_within_a_tick() -> None:
    d = Deadlines(TICK)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError), d.within(0.05):
        await asyncio.sleep(5)
    assert 0.05 <= time.monotonic() - t0 < 0.05 + 5 * TICK
    await asyncio.sleep(2 * TICK)
    assert d._timer is None  # nothing watched: the sweep stopped


async def test_a_block_done_in_time_is_never_cancelled_later() -> None:
    d = Deadlines(TICK)
    with d.within(0.03):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # past the old deadline: this task must not be cancelled
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_someone_elses_cancel_stays_a_cancel() -> None:
    d = Deadlines(TICK)

    async def watched() -> None:
        with d.within(10):
            await asyncio.sleep(5)

    task = asyncio.create_task(watched())
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_expired_and_cancelled_at_once_is_a_cancel() -> None:
    d = Deadlines(TICK)

    async def watched() -> None:
        with d.within(0.0):
            await asyncio.sleep(5)

    task = asyncio.create_task(watched())
    await asyncio.sleep(0)  # the block is armed and waiting
    d._sweep()  # its deadline has passed: the sweep cancels it
    task.cancel()  # and its caller gives up too: the caller's cancel wins
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_deadline_can_be_armed_and_disarmed_inside_the_block() -> None:
    d = Deadlines(TICK)
    with d.within(None) as watch:
        await asyncio.sleep(0.05)  # no deadline: nothing happens
        watch.at = d.now() + 0.2
        await asyncio.sleep(0.02)
        watch.at = None  # disarmed before it passed
        await asyncio.sleep(0.25)
    with pytest.raises(TimeoutError), d.within(None) as watch:
        watch.at = d.now() + 0.02
        await asyncio.sleep(5)


async def test_many_watches_expire_independently() -> None:
    d = Deadlines(TICK)

    async def watched(seconds: float) -> str:
        try:
            with d.within(seconds):
                await asyncio.sleep(0.1)
        except TimeoutError:
            return "timeout"
        return "done"

    results = await asyncio.gather(*(watched(s) for s in (0.02, 1.0, 0.04, 5.0)))
    assert results == ["timeout", "done", "timeout", "done"]
