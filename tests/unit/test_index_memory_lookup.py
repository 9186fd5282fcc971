"""MemoryBlockIndex.lookup_now (C-level passes) against a plain per-key loop over the same
entries, after random records, removals, capacity changes and the passing of time."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from router.index.memory import MemoryBlockIndex
from router.types import BackendId, BlockKey

REPLICAS = [BackendId(f"http://r{i}") for i in range(3)]
keys_st = st.lists(st.integers(0, 12).map(BlockKey), min_size=0, max_size=14)
op_st = st.one_of(
    st.tuples(st.just("record"), st.sampled_from(REPLICAS), keys_st, st.sampled_from([None, 1.0, 5.0])),
    st.tuples(st.just("remove"), st.sampled_from(REPLICAS), keys_st, st.none()),
    st.tuples(st.just("capacity"), st.sampled_from(REPLICAS), st.just([]), st.sampled_from([None, 3, 8])),
    st.tuples(st.just("wait"), st.just(REPLICAS[0]), st.just([]), st.sampled_from([0.5, 2.0, 6.0])),
)


def reference(index: MemoryBlockIndex, keys: list[BlockKey], now: float) -> dict[BackendId, int]:
    runs = {}
    for replica, entries in index._lru.items():
        n = 0
        for key in keys:
            expiry = entries.get(key)
            if expiry is None or expiry <= now:
                break
            n += 1
        if n:
            runs[replica] = n
    return runs


@settings(max_examples=300, deadline=None)
@given(st.lists(op_st, max_size=40), st.lists(keys_st, min_size=1, max_size=6))
def test_lookup_equals_a_per_key_loop(ops: list[tuple[str, BackendId, list[BlockKey], object]],
                                      lookups: list[list[BlockKey]]) -> None:
    now = [100.0]
    index = MemoryBlockIndex(clock=lambda: now[0])
    for kind, replica, keys, arg in ops:
        if kind == "record":
            index.record_now(replica, keys, ttl_s=arg)  # type: ignore[arg-type]
        elif kind == "remove":
            asyncio.run(index.remove(replica, keys))
        elif kind == "capacity":
            asyncio.run(index.set_capacity(replica, arg))  # type: ignore[arg-type]
        else:
            now[0] += arg  # type: ignore[operator]
        for keys_ in lookups:
            assert index.lookup_now(keys_) == reference(index, keys_, now[0])
