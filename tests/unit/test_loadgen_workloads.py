"""Workload generators: determinism from the seed, prefix structure, churn past capacity, Mooncake blocks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from loadtest.runner.ceiling import SentPrompt, ceiling
from loadtest.traces import (
    FIRST_TOKEN_ID,
    TraceRecord,
    find_trace,
    prompt_token_ids,
    read_mooncake,
    scaled_input_length,
)
from loadtest.workloads import WORKLOAD_NAMES, History, build_workload
from loadtest.workloads.text import load_tokenizer
from router.hashing.keys import prompt_keys

BS = 16


def _ids(workload_name: str, seed: int = 3, **params: object) -> list[list[int]]:
    tok = load_tokenizer()
    wl = build_workload(workload_name, seed, **params)
    out = []
    for conv in wl.conversations:
        _, body = History(conv).body(0, "completions", "m")
        prompt = body["prompt"]
        out.append(list(prompt) if isinstance(prompt, list) else tok.encode_completion(prompt))
    return out


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_same_seed_same_requests_other_seed_other_requests(name: str) -> None:
    a = build_workload(name, 7, requests=24, capacity_tokens=2048)
    b = build_workload(name, 7, requests=24, capacity_tokens=2048)
    c = build_workload(name, 8, requests=24, capacity_tokens=2048)
    assert a.conversations == b.conversations
    assert a.conversations != c.conversations
    assert 0 < a.n_requests <= 24


def test_shared_prefix_groups_share_their_system_blocks_and_nothing_else() -> None:
    wl = build_workload("shared_prefix", 1, requests=40, groups=4, system_tokens=128, question_tokens=32)
    counts = Counter(c.system for c in wl.conversations)
    assert len(counts) == 4 and set(counts.values()) == {10}
    tok = load_tokenizer()
    keys = {}
    for conv in wl.conversations:
        _, body = History(conv).body(0, "completions", "m")
        keys.setdefault(conv.system, []).append(prompt_keys(tok.encode_completion(body["prompt"]), BS, "m"))
    firsts = {system: {k[0] for k in ks} for system, ks in keys.items()}
    assert all(len(f) == 1 for f in firsts.values())          # one group: one first block
    assert len(set().union(*firsts.values())) == 4             # groups: distinct first blocks
    for ks in keys.values():                                   # whole system prompt (minus a boundary block) shared
        shared = min(sum(1 for x, y in zip(ks[0], k, strict=False) if x == y) for k in ks[1:])
        assert shared >= 128 // BS - 2


def test_multi_turn_history_grows_with_the_servers_replies() -> None:
    wl = build_workload("multi_turn", 2, requests=6, turns=3)
    conv = wl.conversations[0]
    history = History(conv)
    _, first = history.body(0, "chat", "m")
    history.replies.append("REPLY-ONE")
    _, second = history.body(1, "chat", "m")
    assert second["messages"][: len(first["messages"])] == first["messages"]
    assert second["messages"][len(first["messages"])] == {"role": "assistant", "content": "REPLY-ONE"}
    assert second["messages"][-1]["role"] == "user"
    p0 = history.prompt(0)
    assert history.prompt(1).startswith(p0 + " REPLY-ONE")


def test_hot_prefix_puts_most_traffic_on_one_prefix() -> None:
    wl = build_workload("hot_prefix", 4, requests=200, hot_fraction=0.8)
    top, n = Counter(c.system for c in wl.conversations).most_common(1)[0]
    assert 0.7 < n / 200 < 0.9
    assert top.startswith("Hot:")


def test_zero_reuse_has_a_zero_ceiling() -> None:
    prompts = [SentPrompt(ids) for ids in _ids("zero_reuse", requests=30, system_tokens=64)]
    assert ceiling(prompts, BS).rate == 0.0


def test_shared_prefix_ceiling_counts_every_repeat_of_a_system_prompt() -> None:
    prompts = [SentPrompt(ids) for ids in _ids("shared_prefix", requests=40, groups=4, system_tokens=256)]
    top = ceiling(prompts, BS)
    # 36 of 40 requests repeat a ~256-token system prompt of ~600 tokens in all: well above zero, below 1.
    assert 0.25 < top.rate < 0.9


def test_churn_distinct_prefixes_exceed_the_fleets_cache() -> None:
    wl = build_workload("churn", 5, requests=300, system_tokens=128, capacity_tokens=4 * 64 * 16, churn_factor=2.0)
    distinct = {c.system for c in wl.conversations}
    assert len(distinct) * 128 > 4 * 64 * 16
    assert wl.params["exceeds_capacity"] is True
    assert len(distinct) < 300  # prefixes are reused, so an unlimited cache would hit


def test_mooncake_block_mapping_follows_hash_ids() -> None:
    a = TraceRecord(0, 1000, 10, (0, 1))      # 512 + 488 tokens
    b = TraceRecord(5, 1500, 10, (0, 1, 2))   # shares the first two blocks
    c = TraceRecord(9, 700, 10, (3, 4))       # shares nothing
    ia, ib, ic = (prompt_token_ids(r, seed=1) for r in (a, b, c))
    assert len(ia) == 1000 and len(ib) == 1500
    assert ia[:512] == ib[:512] and ia[512:1000] == ib[512:1000]
    assert ia[:16] != ic[:16]
    assert min(ia + ib + ic) >= FIRST_TOKEN_ID
    assert prompt_token_ids(a, seed=1) == ia and prompt_token_ids(a, seed=2) != ia
    # size scale: 32 tokens per id keeps the last block's fill ratio (488/512 -> 30/32)
    assert scaled_input_length(a, 32) == 32 + 30
    assert prompt_token_ids(b, 1, 32)[:62] == prompt_token_ids(a, 1, 32)


def test_mooncake_replay_limits_count_and_scales_time() -> None:
    path = find_trace("mooncake_synthetic")
    assert isinstance(path, Path)
    slow = build_workload("mooncake_synthetic", 0, requests=20, time_scale=1.0, block_tokens=16)
    fast = build_workload("mooncake_synthetic", 0, requests=20, time_scale=0.1, block_tokens=16)
    assert slow.n_requests == 20 and slow.timed
    last_slow = slow.conversations[-1].arrival_s or 0.0
    assert last_slow > 0
    assert fast.conversations[-1].arrival_s == pytest.approx(last_slow * 0.1)
    first = next(read_mooncake(path))
    turn = slow.conversations[0].turns[0]
    assert turn.token_ids is not None
    assert len(turn.token_ids) == scaled_input_length(first, 16) == len(first.hash_ids) * 16 - 16 + round(
        (first.input_length - 512 * (len(first.hash_ids) - 1)) * 16 / 512)


def test_mooncake_clipping_keeps_the_prefix() -> None:
    full = build_workload("mooncake", 0, requests=10, block_tokens=32)
    clipped = build_workload("mooncake", 0, requests=10, block_tokens=32, max_input_tokens=100)
    for a, b in zip(full.conversations, clipped.conversations, strict=True):
        ids_a, ids_b = a.turns[0].token_ids or (), b.turns[0].token_ids or ()
        assert len(ids_b) == min(100, len(ids_a)) and ids_a[: len(ids_b)] == ids_b
