"""The ceiling on small examples derived by hand (block size 4 unless said otherwise)."""

from __future__ import annotations

from loadtest.runner.ceiling import SentPrompt, ceiling

A = list(range(100, 110))  # 10 tokens: 2 full blocks of 4 + 2 spare


def test_first_request_never_hits() -> None:
    top = ceiling([SentPrompt(A)], 4)
    assert (top.hit_tokens, top.prompt_tokens, top.rate) == (0, 10, 0.0)


def test_repeat_hits_its_full_blocks_and_last_token_cap_applies() -> None:
    # A again: 2 blocks matched, cap (10-1)//4 = 2 -> 8 hit tokens.
    # A[:8] (8 tokens, exactly 2 blocks): matched 2 but cap (8-1)//4 = 1 -> 4 hit tokens.
    # A[:8] + [7, 7, 7]: matched 2, cap (11-1)//4 = 2 -> 8.
    top = ceiling([SentPrompt(A), SentPrompt(A), SentPrompt(A[:8]), SentPrompt([*A[:8], 7, 7, 7])], 4)
    assert top.hit_tokens == 8 + 4 + 8
    assert top.prompt_tokens == 10 + 10 + 8 + 11
    assert abs(top.rate - 20 / 39) < 1e-12


def test_a_changed_first_block_breaks_the_chain() -> None:
    changed = [0, *A[1:]]  # same blocks 2.. but the chain differs from block 1 on
    assert ceiling([SentPrompt(A), SentPrompt(changed)], 4).hit_tokens == 0


def test_reply_blocks_count_for_the_next_turn() -> None:
    reply = [50, 51, 52, 53, 54, 55]
    nxt = [*A, *reply, 9, 9, 9]  # 19 tokens: prompt+reply = 16 tokens = 4 blocks known; cap (19-1)//4 = 4
    with_reply = ceiling([SentPrompt(A, cached_after=A + reply), SentPrompt(nxt)], 4)
    without = ceiling([SentPrompt(A), SentPrompt(nxt)], 4)
    assert with_reply.hit_tokens == 16
    assert without.hit_tokens == 8


def test_block_size_changes_the_answer() -> None:
    # block 8: A has 1 full block; repeat -> matched 1, cap (10-1)//8 = 1 -> 8 tokens.
    assert ceiling([SentPrompt(A), SentPrompt(A)], 8).hit_tokens == 8
    # block 16: no full block at all.
    assert ceiling([SentPrompt(A), SentPrompt(A)], 16).hit_tokens == 0
