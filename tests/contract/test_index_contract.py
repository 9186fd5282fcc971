"""The BlockIndex contract (router/index/base.py), run unchanged against every backend."""

from __future__ import annotations

import asyncio

from router.index import BlockIndex
from router.types import BackendId, BlockKey

A, B, C = BackendId("http://a:1"), BackendId("http://b:1"), BackendId("http://c:1")


def ks(*ns: int) -> list[BlockKey]:
    # Keys span the full unsigned 64-bit range, as real xxh3 keys do.
    return [BlockKey((n * 0x9E3779B97F4A7C15) % 2**64) for n in ns]


async def test_empty_input_and_empty_index(index: BlockIndex) -> None:
    assert await index.lookup([]) == {}
    assert await index.lookup(ks(1, 2)) == {}
    await index.record(A, [], ttl_s=None)
    assert dict(await index.sizes()).get(A, 0) == 0


async def test_leading_runs_per_replica(index: BlockIndex) -> None:
    await index.record(A, ks(1, 2, 3, 4), ttl_s=None)
    await index.record(B, ks(1, 2), ttl_s=None)
    await index.record(C, ks(2, 3, 4), ttl_s=None)  # no first block: a zero run
    assert await index.lookup(ks(1, 2, 3, 4, 5)) == {A: 4, B: 2}
    assert await index.lookup(ks(1, 2)) == {A: 2, B: 2}
    assert await index.lookup(ks(9, 1, 2)) == {}


async def test_gap_ends_a_run(index: BlockIndex) -> None:
    await index.record(A, ks(1, 2, 3, 4), ttl_s=None)
    await index.remove(A, ks(2))
    assert await index.lookup(ks(1, 2, 3, 4)) == {A: 1}


async def test_duplicates_are_idempotent(index: BlockIndex) -> None:
    await index.record(A, ks(1, 2), ttl_s=None)
    await index.record(A, ks(1, 2), ttl_s=None)
    await index.record(A, ks(1, 1, 2), ttl_s=None)
    assert dict(await index.sizes())[A] == 2
    assert await index.lookup(ks(1, 2)) == {A: 2}


async def test_remove_unknown_is_ignored(index: BlockIndex) -> None:
    await index.remove(A, ks(1))
    await index.record(A, ks(1), ttl_s=None)
    await index.remove(A, ks(7, 8))
    await index.remove(B, ks(1))
    assert await index.lookup(ks(1)) == {A: 1}


async def test_evict_before_add(index: BlockIndex) -> None:
    await index.remove(A, ks(1, 2))
    await index.record(A, ks(1, 2), ttl_s=None)
    assert await index.lookup(ks(1, 2)) == {A: 2}


async def test_clear_then_add_and_isolation(index: BlockIndex) -> None:
    await index.record(A, ks(1, 2, 3), ttl_s=None)
    await index.record(B, ks(1, 2), ttl_s=None)
    assert await index.clear(A) == 3
    assert await index.lookup(ks(1, 2, 3)) == {B: 2}
    assert await index.clear(C) == 0
    await index.record(A, ks(1), ttl_s=None)
    assert await index.lookup(ks(1, 2, 3)) == {A: 1, B: 2}
    assert dict(await index.sizes()) == {A: 1, B: 2}


async def test_capacity_trims_least_recently_used(index: BlockIndex) -> None:
    await index.set_capacity(A, 4)
    await index.record(A, ks(1, 2, 3), ttl_s=None)
    await index.record(A, ks(10, 11), ttl_s=None)  # 1 is the oldest: dropped
    assert dict(await index.sizes())[A] == 4
    assert await index.lookup(ks(1)) == {}
    await index.record(A, ks(2), ttl_s=None)  # refresh 2; next trim drops 3
    await index.record(A, ks(12), ttl_s=None)
    assert await index.lookup(ks(2)) == {A: 1}
    assert await index.lookup(ks(3)) == {}
    await index.set_capacity(A, 1)  # lowering trims at once, keeping the most recent
    assert dict(await index.sizes())[A] == 1
    assert await index.lookup(ks(12)) == {A: 1}


async def test_capacity_is_per_replica(index: BlockIndex) -> None:
    await index.set_capacity(A, 1)
    await index.record(A, ks(1, 2), ttl_s=None)
    await index.record(B, ks(1, 2), ttl_s=None)
    assert dict(await index.sizes()) == {A: 1, B: 2}
    await index.set_capacity(A, None)
    await index.record(A, ks(1, 2, 3), ttl_s=None)
    assert dict(await index.sizes())[A] == 3


async def test_lookup_does_not_change_recency(index: BlockIndex) -> None:
    await index.set_capacity(A, 2)
    await index.record(A, ks(1), ttl_s=None)
    await index.record(A, ks(2), ttl_s=None)
    await index.lookup(ks(1))
    await index.record(A, ks(3), ttl_s=None)
    assert await index.lookup(ks(1)) == {}
    assert await index.lookup(ks(2)) == {A: 1}


async def test_ttl_expires_and_only_extends(index: BlockIndex) -> None:
    await index.record(A, ks(1, 2), ttl_s=0.3)
    await index.record(B, ks(1, 2), ttl_s=None)
    await index.record(B, ks(1, 2), ttl_s=0.1)  # must not shorten a confirmed entry
    await index.record(C, ks(1), ttl_s=5.0)
    await index.record(C, ks(1), ttl_s=0.1)  # must not shorten a longer TTL
    assert await index.lookup(ks(1, 2)) == {A: 2, B: 2, C: 1}
    await asyncio.sleep(0.45)
    assert await index.lookup(ks(1, 2)) == {B: 2, C: 1}
    await index.purge_expired()
    sizes = dict(await index.sizes())
    assert sizes.get(A, 0) == 0 and sizes[B] == 2


async def test_clear_all(index: BlockIndex) -> None:
    await index.record(A, ks(1), ttl_s=None)
    await index.record(B, ks(2), ttl_s=1.0)
    await index.clear_all()
    assert await index.lookup(ks(1)) == {} and await index.lookup(ks(2)) == {}
    assert not {k: v for k, v in (await index.sizes()).items() if v}


async def test_long_chain(index: BlockIndex) -> None:
    keys = ks(*range(1, 2049))  # a 32k-token prompt at block size 16
    await index.record(A, keys, ttl_s=None)
    await index.record(B, keys[:1000], ttl_s=None)
    assert await index.lookup(keys) == {A: 2048, B: 1000}
