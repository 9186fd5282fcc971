"""MemoryBlockIndex leaves a TTL'd key recorded again within REFRESH_EVERY_S (or a tenth of its
TTL) as it was: its expiry lags the exact one by at most that, its LRU place too; everything
else (new keys, older ones, confirmed entries, gaps) is recorded exactly."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from router.index.memory import REFRESH_EVERY_S, MemoryBlockIndex
from router.types import BackendId, BlockKey

A = BackendId("http://a:1")
K = [BlockKey(n * 0x9E3779B97F4A7C15 % 2**64) for n in range(1, 40)]


def _index() -> tuple[MemoryBlockIndex, list[float]]:
    now = [0.0]
    return MemoryBlockIndex(clock=lambda: now[0]), now


async def test_a_recent_prefix_keeps_its_place_and_an_older_one_moves() -> None:
    index, now = _index()
    await index.set_capacity(A, 6)
    await index.record(A, K[0:4], ttl_s=600)
    now[0] = 0.1
    await index.record(A, K[10:12], ttl_s=600)
    now[0] = 0.5
    await index.record(A, [*K[0:4], K[20]], ttl_s=600)  # the prefix is 0.5 s old: not moved
    assert index.lookup_now(K[0:4]) == {}  # so the trim took its oldest key
    assert index.lookup_now(K[10:12]) == {A: 2}
    now[0] = 2.0
    await index.record(A, [*K[1:4], K[21]], ttl_s=600)  # 2 s old: moved to the young end
    assert index.lookup_now(K[10:11]) == {}  # the oldest now
    assert index.lookup_now(K[1:4]) == {A: 3}


async def test_expiry_lags_by_at_most_the_interval() -> None:
    index, now = _index()
    await index.record(A, K[0:3], ttl_s=600)
    now[0] = 0.5
    await index.record(A, K[0:3], ttl_s=600)  # skipped: expires at 600, not 600.5
    now[0] = 599.9
    assert index.lookup_now(K[0:3]) == {A: 3}
    now[0] = 600.1
    assert index.lookup_now(K[0:3]) == {}
    now[0] = 601.0
    await index.record(A, K[0:3], ttl_s=600)
    now[0] = 603.0
    await index.record(A, K[0:3], ttl_s=600)  # 2 s later: refreshed, expires at 1203
    now[0] = 1202.0
    assert index.lookup_now(K[0:3]) == {A: 3}


async def test_short_ttls_refresh_at_a_tenth_of_their_ttl() -> None:
    index, now = _index()
    await index.record(A, K[0:2], ttl_s=2.0)  # speculative TTLs: the interval is 0.2 s
    now[0] = 0.3
    await index.record(A, K[0:2], ttl_s=2.0)
    now[0] = 2.2
    assert index.lookup_now(K[0:2]) == {A: 2}


async def test_confirmed_entries_and_gaps_take_the_exact_path() -> None:
    index, now = _index()
    await index.set_capacity(A, 3)
    await index.record(A, K[0:1], ttl_s=None)  # confirmed
    await index.record(A, K[1:2], ttl_s=600)
    await index.record(A, K[0:1], ttl_s=600)  # recency still refreshed, expiry still never
    await index.record(A, K[2:4], ttl_s=600)  # trims K1, the oldest
    assert index.lookup_now(K[0:1]) == {A: 1} and index.lookup_now(K[1:2]) == {}
    now[0] = 10_000.0
    assert index.lookup_now(K[0:1]) == {A: 1}
    # A gap inside the held keys: recorded exactly, the gap filled.
    index2, _ = _index()
    await index2.record(A, K[0:5], ttl_s=600)
    await index2.remove(A, K[2:3])
    await index2.record(A, K[0:6], ttl_s=600)
    assert index2.lookup_now(K[0:6]) == {A: 6}


ops = st.lists(st.tuples(st.floats(0, 3), st.integers(0, 12), st.integers(1, 12), st.sampled_from([1.0, 5.0, 600.0])),
               max_size=40)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_expiry_is_the_exact_one_or_at_most_the_interval_earlier(steps: list[tuple[float, int, int, float]]) -> None:
    index, now = _index()
    exact: dict[BlockKey, float] = {}
    lag: dict[BlockKey, float] = {}
    for wait, start, length, ttl in steps:
        now[0] += wait
        keys = K[start : start + length]
        index.record_now(A, keys, ttl_s=ttl)
        for k in keys:
            if now[0] + ttl >= exact.get(k, -math.inf):
                exact[k] = now[0] + ttl
                lag[k] = min(REFRESH_EVERY_S, ttl / 10)
    held = index._lru.get(A, {})
    assert set(held) == set(exact)
    for k, expiry in held.items():
        assert exact[k] - lag[k] <= expiry <= exact[k], (k, expiry, exact[k])
