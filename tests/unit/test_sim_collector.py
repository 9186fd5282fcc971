"""The load-test processes' collector: full collections only while nothing is measured."""

from __future__ import annotations

import asyncio
import gc

from loadtest.engine.collector import NO_FULL, IdleCollector, settle, young_only


def test_young_only_blocks_full_collections_and_restores_the_threshold() -> None:
    before = gc.get_threshold()
    with young_only():
        assert gc.get_threshold() == (before[0], before[1], NO_FULL)
    assert gc.get_threshold() == before


def test_settle_freezes_the_survivors_and_collects_the_garbage_frozen_before() -> None:
    class Node:
        other: object

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the cyclic collector can free it
    try:
        settle()
        assert gc.get_freeze_count() > 0 and gc.is_tracked(a)
        alive = gc.get_freeze_count()
        del a, b
        settle()  # the frozen cycle is now garbage: unfreeze, collect, freeze again
        assert gc.get_freeze_count() <= alive - 2
    finally:
        gc.unfreeze()


async def test_idle_collector_waits_for_idle_after_traffic() -> None:
    busy = True
    collector = IdleCollector(lambda: not busy, quiet_s=0.02, max_interval_s=3600, poll_s=0.005)
    before = gc.get_threshold()
    collector.start()
    try:
        assert gc.get_threshold()[2] == NO_FULL
        for _ in range(20):
            await asyncio.sleep(0.005)
        assert collector.settled == 0  # busy all along: no full collection
        busy = False
        for _ in range(400):
            if collector.settled:
                break
            await asyncio.sleep(0.005)
        assert collector.settled == 1
        for _ in range(20):
            await asyncio.sleep(0.005)
        assert collector.settled == 1  # idle and nothing ran since: no more collections
    finally:
        await collector.stop()
        gc.unfreeze()
    assert gc.get_threshold() == before


async def test_idle_collector_collects_a_long_busy_stretch_at_the_latest_interval() -> None:
    collector = IdleCollector(lambda: False, quiet_s=0.01, max_interval_s=0.02, poll_s=0.005)
    collector.start()
    try:
        for _ in range(400):
            if collector.settled:
                break
            await asyncio.sleep(0.005)
        assert collector.settled >= 1
    finally:
        await collector.stop()
        gc.unfreeze()
