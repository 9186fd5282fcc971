"""The chain memo (router.hashing.chain_memo) gives exactly the token count and keys of
tokenizing the whole text and hashing every block, whatever earlier prompts filled it with:
shared prefixes, other block sizes, other models or salts, with and without special tokens."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from loadtest.bench.targets import MODEL_DIR
from router.hashing.chain_memo import OverBudget
from router.hashing.keys import first_link_seed, prompt_keys
from router.hashing.segments import cut_points
from router.hashing.tokenizer import ModelTokenizer

_PLAIN = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
_WORDS = ["the", "cache", "Router", "x1", "42", "año", "naïve", "I'm", "--", "!!", "\n", "\n\n", "  ", "\t",
          "日本", "😀", "don't", "3.14", "<s>", "</s>", "<|im_start|>", "block", "replica", "prefix"]


def _tokenizer(chunk_chars: int) -> ModelTokenizer:
    mt = ModelTokenizer.from_dir(MODEL_DIR)
    assert mt.enable_segment_cache(chunk_chars=chunk_chars, max_entries=64)  # small: evictions happen
    return mt


def _expected(text: str, special: bool, block: int, model: str, salt: str | None) -> tuple[int, list[int]]:
    ids = _PLAIN.encode(text, add_special_tokens=special).ids
    return len(ids), prompt_keys(ids, block, model, salt)


texts = st.lists(st.sampled_from(_WORDS) | st.text(max_size=6), min_size=0, max_size=150).map(" ".join)


@settings(max_examples=60, deadline=None)
@given(prefix=texts, tails=st.lists(texts, min_size=1, max_size=4), special=st.booleans(),
       block=st.sampled_from([1, 3, 16, 32]), salt=st.sampled_from([None, "s1"]),
       chunk_chars=st.sampled_from([8, 40, 256]))
def test_memo_equals_whole_encode_then_hash(prefix: str, tails: list[str], special: bool, block: int,
                                            salt: str | None, chunk_chars: int) -> None:
    mt = _tokenizer(chunk_chars)
    for model in ("m1", "m2"):
        for tail in [*tails, *tails]:  # the second pass finds every chunk memoized
            text = prefix + " " + tail
            got = mt.encode_keys(text, add_special_tokens=special, block_size=block,
                                 seed=first_link_seed(model, salt))
            assert got is not None
            assert (got.tokens, got.keys) == _expected(text, special, block, model, salt)


def test_shared_prefix_is_served_from_the_memo() -> None:
    mt = _tokenizer(64)
    doc = " ".join(_WORDS * 20)
    seed = first_link_seed("m", None)
    mt.encode_keys(doc + " first question", add_special_tokens=True, block_size=16, seed=seed)
    memo = mt._memo
    assert memo is not None
    misses = memo.misses
    got = mt.encode_keys(doc + " second question", add_special_tokens=True, block_size=16, seed=seed)
    assert got is not None and (got.tokens, got.keys) == _expected(doc + " second question", True, 16, "m", None)
    assert memo.misses - misses <= 1  # at most the chunk where the two prompts part
    assert memo.hits >= len(cut_points(doc, 64)) - 1  # every chunk of the document
    # Another salt never reuses the first chain's entries.
    other = mt.encode_keys(doc + " second question", add_special_tokens=True, block_size=16,
                           seed=first_link_seed("m", "tenant-b"))
    assert other is not None and not set(other.keys) & set(got.keys)


def test_over_budget_only_for_text_the_memo_does_not_hold() -> None:
    mt = _tokenizer(256)
    doc = " ".join(_WORDS * 60)  # ~7k characters
    seed = first_link_seed("m", None)
    with pytest.raises(OverBudget):  # nothing memoized yet: all of it is new
        mt.encode_keys(doc + " q1", add_special_tokens=True, block_size=16, seed=seed, budget_chars=1000)
    whole = mt.encode_keys(doc + " q1", add_special_tokens=True, block_size=16, seed=seed)  # as in the thread
    assert whole is not None
    again = mt.encode_keys(doc + " q2", add_special_tokens=True, block_size=16, seed=seed, budget_chars=1000)
    assert again is not None and (again.tokens, again.keys) == _expected(doc + " q2", True, 16, "m", None)


def test_cached_entries_add_nothing_to_a_full_garbage_collection() -> None:
    """Memo and segment-cache entries are tuples of ints, which the collector stops tracking:
    a router with full caches pays nothing for them in a full collection's pause (NamedTuples
    or lists would stay tracked; ~16k memo entries were ~15 ms of a 58 ms pause)."""
    import gc

    mt = _tokenizer(40)
    seed = first_link_seed("m", None)
    for i in range(30):
        # Distinct from the first character: every cut is a memo entry; the chunks with non-ASCII
        # words are segment-cache entries (short ASCII ones skip that cache: router.hashing.words).
        mt.encode_keys(f"question {i}: " + " ".join(_WORDS * 3) + " about the cache", add_special_tokens=True,
                       block_size=16, seed=seed)
    for _ in range(4):  # a tuple is untracked once its items are: each nesting level may take a pass
        gc.collect()
    memo, segments = mt._memo, mt.segment_cache
    assert memo is not None and segments is not None
    entries = [*memo._lru.keys(), *memo._lru.values(), *segments._lru.values()]
    assert len(memo._lru) > 30 and len(segments._lru) > 5
    tracked = [e for e in entries if gc.is_tracked(e)]
    assert not tracked, tracked[:3]


@settings(max_examples=25, deadline=None)
@given(turns=st.lists(texts, min_size=2, max_size=14), block=st.sampled_from([1, 16]),
       chunk_chars=st.sampled_from([8, 40]))
def test_a_conversation_growing_turn_by_turn_keeps_exact_keys(turns: list[str], block: int, chunk_chars: int) -> None:
    """Each turn extends the last one's held prefix (its keys become pieces of the next
    entries'); past eight pieces the keys are stored flat. Every turn still equals the whole."""
    mt = _tokenizer(chunk_chars)
    seed = first_link_seed("m", None)
    text = ""
    for turn in turns:
        text = f"{text} user: {turn} assistant: ok"
        got = mt.encode_keys(text, add_special_tokens=True, block_size=block, seed=seed)
        assert got is not None and (got.tokens, got.keys) == _expected(text, True, block, "m", None)


def test_prompts_sharing_a_document_hold_its_keys_once() -> None:
    mt = ModelTokenizer.from_dir(MODEL_DIR)
    assert mt.enable_segment_cache(chunk_chars=256, max_entries=4096)
    doc = " ".join(_WORDS * 200)  # ~20k characters, ~400 blocks of 16
    seed = first_link_seed("m", None)
    rng = random.Random(0)
    for i in range(200):
        # A question long enough to be cut itself: each prompt stores entries of its own.
        question = " ".join(rng.choice(_WORDS[:8]) for _ in range(60))
        got = mt.encode_keys(f"{doc} question {i}: {question}", add_special_tokens=True, block_size=16, seed=seed)
        assert got is not None and len(got.keys) > 300
    memo = mt._memo
    assert memo is not None
    tuples = {id(part): len(part) for _, _, pieces in memo._lru.values() for part, _ in pieces}
    assert len(memo._lru) > 250  # the document's cuts, and cuts of each question
    # The document's keys once (~400), then a question's keys per prompt: not 200 copies (~80k).
    assert sum(tuples.values()) < 450 + 200 * 15, sum(tuples.values())
