"""The simulated engine's prefix cache: hashes, lookup cap, LRU, ref counts, salts, LoRA, generated blocks."""

from __future__ import annotations

import hashlib
import pickle
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loadtest.engine.cache import (
    NONE_HASH,
    Cleared,
    PrefixCache,
    Removed,
    SeqBlocks,
    Stored,
    as_int,
    chain_digests,
    max_hit_blocks,
)

BS = 4


def seq(
    cache: PrefixCache, tokens: list[int], *, lora: str | None = None, salt: str | None = None
) -> SeqBlocks:
    s = SeqBlocks(cache, list(tokens), len(tokens), lora_name=lora, salt=salt)
    s.digests = chain_digests(tokens, cache.block_size, lora_name=lora, salt=salt)
    return s


def run(cache: PrefixCache, tokens: list[int], generated: int = 1, **kw: str) -> int:
    """One whole request: prefill, ``generated`` tokens, release. Returns cached prompt tokens."""
    s = seq(cache, tokens, **kw)
    hits = cache.lookup(s.digests, s.prompt_len)
    s.schedule_prefill(hits)
    s.tokens.append(9000)
    for i in range(1, generated):
        s.schedule_decode()
        s.tokens.append(9000 + i)
    s.release()
    return hits * cache.block_size


def test_digest_is_sha256_over_pickled_parent_tokens_extra_keys() -> None:
    d0, d1 = chain_digests(list(range(8)), BS)
    assert d0 == hashlib.sha256(pickle.dumps((NONE_HASH, (0, 1, 2, 3), None), protocol=5)).digest()
    assert d1 == hashlib.sha256(pickle.dumps((d0, (4, 5, 6, 7), None), protocol=5)).digest()
    salted = chain_digests(list(range(8)), BS, salt="s", lora_name="ad")
    assert (
        salted[0] == hashlib.sha256(pickle.dumps((NONE_HASH, (0, 1, 2, 3), ("ad", "s")), protocol=5)).digest()
    )
    assert salted[1] == hashlib.sha256(pickle.dumps((salted[0], (4, 5, 6, 7), ("ad",)), protocol=5)).digest()
    assert as_int(d0) == int.from_bytes(d0[24:], "big")


@given(st.lists(st.integers(0, 8191), min_size=0, max_size=64), st.integers(0, 64))
def test_prefix_digests_are_a_prefix(tokens: list[int], cut: int) -> None:
    full = chain_digests(tokens, BS)
    assert len(full) == len(tokens) // BS
    assert chain_digests(tokens[:cut], BS) == full[: cut // BS]


@given(st.lists(st.integers(0, 8191), min_size=BS, max_size=32))
def test_salt_and_lora_give_disjoint_chains(tokens: list[int]) -> None:
    chains = [
        chain_digests(tokens, BS),
        chain_digests(tokens, BS, salt="a"),
        chain_digests(tokens, BS, salt="b"),
        chain_digests(tokens, BS, lora_name="ad"),
        chain_digests(tokens, BS, lora_name="ad", salt="a"),
    ]
    seen: set[bytes] = set()
    for chain in chains:
        assert not seen & set(chain)
        seen |= set(chain)


def test_lookup_caps_at_last_prompt_token() -> None:
    cache = PrefixCache(16, BS)
    tokens = list(range(8))
    assert run(cache, tokens) == 0
    assert run(cache, tokens) == 4  # 2 full blocks cached, but the last token is recomputed: 1 block
    assert max_hit_blocks(8, BS) == 1 and max_hit_blocks(9, BS) == 2 and max_hit_blocks(0, BS) == 0
    assert run(cache, [*tokens, 77]) == 8  # one more token: both blocks count
    assert run(cache, [0, 1, 2, 99, 4, 5, 6, 7, 8]) == 0  # a different first block: nothing


def test_salt_and_lora_isolate_and_match_themselves() -> None:
    cache = PrefixCache(32, BS)
    tokens = list(range(13))
    run(cache, tokens, salt="tenant-a")
    assert run(cache, tokens) == 0
    assert run(cache, tokens, salt="tenant-b") == 0
    assert run(cache, tokens, salt="tenant-a") == 12
    run(cache, tokens, lora="ad1")
    assert run(cache, tokens, lora="ad2") == 0
    assert run(cache, tokens, lora="ad1") == 12


def test_events_stored_in_runs_salt_on_first_block_only() -> None:
    cache = PrefixCache(32, BS)
    s = seq(cache, list(range(9)), salt="s", lora="ad")
    s.schedule_prefill(0)
    (ev,) = cache.take_events()
    assert isinstance(ev, Stored)
    assert ev.digests == s.digests[:2] and ev.parent is None and ev.salt == "s" and ev.lora_name == "ad"
    assert ev.token_ids == list(range(8))
    s.tokens += [100, 101]  # a decode step computes every token sampled so far: 11 of them
    s.schedule_decode()
    assert cache.take_events() == []  # block 2 holds 3 computed tokens
    s.tokens.append(102)
    s.schedule_decode()
    (ev,) = cache.take_events()
    assert isinstance(ev, Stored) and ev.parent == s.digests[1] and ev.salt is None
    assert ev.token_ids == [8, 100, 101, 102]


def test_generated_blocks_are_cached_and_hit_by_a_follow_up() -> None:
    cache = PrefixCache(32, BS)
    s = seq(cache, list(range(6)))
    s.schedule_prefill(0)
    for t in range(20, 27):  # 7 generated tokens; the last one is never computed
        s.tokens.append(t)
        if t != 26:
            s.schedule_decode()
    s.release()
    assert len(cache) == 3  # 12 computed tokens (6 prompt + 6 generated) = 3 full blocks
    follow_up = [*s.tokens, 50, 51, 52]  # the reply appended, like a multi-turn turn
    assert run(cache, follow_up) == 12


def test_lru_evicts_least_recently_freed_deepest_first() -> None:
    cache = PrefixCache(6, BS)
    a, b = list(range(100, 108)), list(range(200, 208))  # 2 blocks each
    run(cache, a)
    run(cache, b)
    cache.take_events()
    a_digests = chain_digests(a, BS)
    run(cache, list(range(300, 308)))  # needs 2: the 2 never-used blocks go first, nothing evicted
    assert not [e for e in cache.take_events() if isinstance(e, Removed)]
    run(cache, list(range(400, 408)))  # now the oldest freed: a, deepest block first
    removed = [e.digest for e in cache.take_events() if isinstance(e, Removed)]
    assert removed == [a_digests[1], a_digests[0]]
    assert run(cache, b) == 4  # b survived


def test_a_hit_refreshes_lru_position() -> None:
    cache = PrefixCache(4, BS)
    a, b = list(range(100, 109)), list(range(200, 208))
    run(cache, a)  # 3 blocks (9 tokens)
    assert run(cache, a) == 8  # touched again: a is now the most recently freed
    run(cache, b)  # needs 2 blocks: the free one, then the oldest: a's deepest (its partial third block)
    assert run(cache, a) == 8


def test_blocks_held_by_a_running_request_are_never_evicted() -> None:
    cache = PrefixCache(4, BS)
    held = seq(cache, list(range(8)))
    held.schedule_prefill(0)
    assert cache.num_free == 2 and cache.usage == 0.5
    run(cache, list(range(50, 58)))
    run(cache, list(range(60, 68)))  # evicts the previous free blocks, never the held ones
    assert all(d in cache for d in held.digests)
    with pytest.raises(MemoryError):
        cache.allocate(3)
    held.release()
    assert cache.num_free == 4


def test_shared_blocks_count_references() -> None:
    cache = PrefixCache(8, BS)
    run(cache, list(range(9)))
    one, two = seq(cache, list(range(9))), seq(cache, list(range(9)))
    one.schedule_prefill(cache.lookup(one.digests, 9))
    two.schedule_prefill(cache.lookup(two.digests, 9))
    assert {b.ref_cnt for b in cache.contents().values()} == {2}
    one.release()
    assert {b.ref_cnt for b in cache.contents().values()} == {1}
    two.release()
    assert cache.num_free == 8


def test_concurrent_identical_prompts_store_each_block_once() -> None:
    cache = PrefixCache(16, BS)
    one, two = seq(cache, list(range(9))), seq(cache, list(range(9)))
    one.schedule_prefill(0)
    two.schedule_prefill(0)  # both missed: the second computes the same blocks again
    stored = [e for e in cache.take_events() if isinstance(e, Stored)]
    assert [d for e in stored for d in e.digests] == one.digests
    one.release()
    two.release()
    assert len(cache) == 2


def test_reset_refused_while_held_then_clears_everything() -> None:
    cache = PrefixCache(8, BS)
    run(cache, list(range(9)))
    held = seq(cache, list(range(20, 25)))
    held.schedule_prefill(0)
    assert not cache.reset()
    held.release()
    assert cache.reset()
    assert len(cache) == 0 and cache.num_free == 8
    assert not any(
        isinstance(e, Cleared) for e in cache.take_events()
    )  # the engine sends it with its next step
    assert run(cache, list(range(9))) == 0


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(1, 30)), max_size=60))
def test_random_operations_keep_the_pool_and_its_events_consistent(ops: list[tuple[int, int, int]]) -> None:
    """Invariants under any mix of starts, decode steps, finishes and resets."""
    cache = PrefixCache(12, BS)
    prefixes = [[7] * 9, [8] * 5, list(range(40, 53)), [7] * 9 + [1, 2, 3]]
    running: list[SeqBlocks] = []
    picture: set[bytes] = set()  # what a subscriber would believe, from the events alone

    def drain() -> None:
        for ev in cache.take_events():
            if isinstance(ev, Stored):
                assert ev.parent is None or ev.parent in picture
                picture.update(ev.digests)
            elif isinstance(ev, Removed):
                picture.remove(ev.digest)
            else:
                picture.clear()

    for op, which, n in ops:
        if op == 0:  # start a request if it fits
            s = seq(cache, prefixes[which % 4][: max(1, n % 14)])
            hits = cache.lookup(s.digests, s.prompt_len)
            if cache.free_after_touch(s.digests[:hits]) >= -(-s.prompt_len // BS) - hits:
                s.schedule_prefill(hits)
                s.tokens.append(100 + n)
                running.append(s)
        elif op == 1 and running:  # one decode step if a block is free when needed
            s = running[which % len(running)]
            if len(s.tokens) < len(s.block_ids) * BS or cache.num_free > 0:
                s.schedule_decode()
                s.tokens.append(200 + n)
        elif op == 2 and running:
            running.pop(which % len(running)).release()
        elif op == 3 and not running:
            assert cache.reset()
            picture.clear()  # the engine sends AllBlocksCleared with its next step
        drain()
        held = {i for s in running for i in s.block_ids}
        assert cache.num_free + len(held) == cache.num_blocks
        assert set(cache.contents()) == picture
        holders = Counter(i for s in running for i in s.block_ids)
        for block_id in range(cache.num_blocks):  # a block's references are exactly its holders
            assert cache.ref_count(block_id) == holders[block_id]
        for s in running:  # a block a running request uses keeps its hash: it cannot be evicted
            for i in range(min(s.committed, len(s.block_ids))):
                digest = cache.digest_of(s.block_ids[i])
                assert digest is None or digest == s.digests[i]
                assert digest is None or digest in picture
