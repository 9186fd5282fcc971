"""The simulated engine's timing: slots, FIFO queue, block-budget admission, prefill cost, decode stalls."""

from __future__ import annotations

import asyncio
import time

from loadtest.engine.cache import PrefixCache, SeqBlocks, chain_digests
from loadtest.engine.timing import Scheduler, TimingConfig

BS = 4


def make(cache_blocks: int = 64, **timing: float) -> tuple[PrefixCache, Scheduler, list[int]]:
    cache = PrefixCache(cache_blocks, BS)
    steps: list[int] = []
    sched = Scheduler(cache, TimingConfig(**timing), lambda: steps.append(len(cache.take_events())))  # type: ignore[arg-type]
    return cache, sched, steps


def seq(cache: PrefixCache, tokens: list[int]) -> SeqBlocks:
    s = SeqBlocks(cache, list(tokens), len(tokens))
    s.digests = chain_digests(tokens, BS)
    return s


async def test_slots_and_fifo_order() -> None:
    cache, sched, _ = make(max_num_seqs=2, zero=True)
    seqs = [seq(cache, [i] * 5) for i in range(4)]
    order: list[int] = []

    async def go(i: int) -> None:
        await sched.admit(seqs[i], 1)
        order.append(i)

    tasks = [asyncio.create_task(go(i)) for i in range(4)]
    await asyncio.sleep(0.01)
    assert order == [0, 1] and sched.num_running == 2 and sched.num_waiting == 2
    sched.finish(seqs[1])
    await asyncio.sleep(0.01)
    assert order == [0, 1, 2] and sched.num_waiting == 1
    sched.finish(seqs[0])
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]


async def test_admission_waits_for_blocks_head_of_line() -> None:
    cache, sched, _ = make(cache_blocks=6, max_num_seqs=8, zero=True)
    big = seq(cache, list(range(12)))  # 3 blocks + up to 8 generated tokens: 5 blocks at its longest
    await sched.admit(big, 9)
    waiting_big = seq(cache, list(range(100, 112)))  # needs 3 (plus 0 generated): only 1 is left unreserved
    small = seq(cache, [7])  # 1 block: would fit, but waits behind the head (FCFS)
    t1 = asyncio.create_task(sched.admit(waiting_big, 1))
    t2 = asyncio.create_task(sched.admit(small, 1))
    await asyncio.sleep(0.01)
    assert not t1.done() and not t2.done() and sched.num_waiting == 2
    sched.finish(big)
    await asyncio.gather(t1, t2)
    assert sched.num_running == 2


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    cache, sched, _ = make(max_num_seqs=1, zero=True)
    first, second, third = seq(cache, [1]), seq(cache, [2]), seq(cache, [3])
    await sched.admit(first, 1)
    t = asyncio.create_task(sched.admit(second, 1))
    t3 = asyncio.create_task(sched.admit(third, 1))
    await asyncio.sleep(0.01)
    t.cancel()
    await asyncio.sleep(0.01)
    assert sched.num_waiting == 1
    sched.finish(first)
    await t3
    assert sched.num_running == 1


async def test_admission_is_one_engine_step_with_its_events() -> None:
    cache, sched, steps = make(zero=True)
    await sched.admit(seq(cache, list(range(9))), 1)
    assert steps == [1]  # one BlockStored for the 2 full prompt blocks, published as one batch


async def test_prefill_time_is_proportional_to_uncached_tokens_and_serialised() -> None:
    _, sched, _ = make(prefill_base_ms=0, prefill_ms_per_token=1.0, decode_ms=1)
    t0 = time.monotonic()
    await sched.prefill(40)
    one = time.monotonic() - t0
    assert 0.035 <= one < 0.2
    t0 = time.monotonic()
    await asyncio.gather(sched.prefill(40), sched.prefill(40), sched.prefill(0))
    both = time.monotonic() - t0
    assert 0.075 <= both < 0.3  # the engine computes one prefill after the other: a miss slows everyone
    total = sched.prefill_seconds
    assert abs(total - 0.12) < 1e-9


async def test_a_prefill_stalls_running_decodes() -> None:
    _, sched, _ = make(prefill_base_ms=0, prefill_ms_per_token=1.0, decode_ms=5)
    t0 = time.monotonic()
    await sched.decode_step()
    alone = time.monotonic() - t0
    t0 = time.monotonic()
    await asyncio.gather(sched.prefill(60), sched.decode_step())
    stalled = time.monotonic() - t0
    assert alone < 0.03
    assert stalled >= 0.058  # the decode step waited for the 60 ms prefill


async def test_zero_mode_never_waits() -> None:
    _, sched, _ = make(prefill_ms_per_token=1000.0, decode_ms=1000.0, zero=True)
    t0 = time.monotonic()
    for _ in range(100):
        await sched.prefill(10_000)
        await sched.decode_step()
    assert time.monotonic() - t0 < 0.5
    assert sched.prefill_seconds == 0


async def test_a_bigger_batch_decodes_slower() -> None:
    cache, sched, _ = make(decode_ms=1, decode_ms_per_seq=2.0, max_num_seqs=64)
    t0 = time.monotonic()
    await sched.decode_step()
    alone = time.monotonic() - t0
    for i in range(20):
        await sched.admit(seq(cache, [i + 1]), 1)
    t0 = time.monotonic()
    await sched.decode_step()
    crowded = time.monotonic() - t0
    assert alone < 0.03
    assert crowded >= 0.04  # 1 ms + 20 running x 2 ms
