from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from router.hashing.keys import cacheable_blocks, chain_keys, first_link_seed, prompt_keys

tokens = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=300)
block = st.integers(min_value=1, max_value=64)


@given(tokens, tokens, block)
def test_keys_of_a_prefix_are_a_prefix_of_the_keys(prefix: list[int], rest: list[int], bs: int) -> None:
    whole = prompt_keys(prefix + rest, bs, "m")
    assert prompt_keys(prefix, bs, "m") == whole[: len(prefix) // bs]
    assert len(whole) == len(prefix + rest) // bs


@given(tokens.filter(lambda t: len(t) >= 8), st.sampled_from([("m", None), ("m2", None), ("m", "s1"), ("m", "")]))
def test_other_model_or_salt_gives_disjoint_keys(toks: list[int], other: tuple[str, str | None]) -> None:
    base = set(prompt_keys(toks, 4, "m", "s0"))
    assert base.isdisjoint(prompt_keys(toks, 4, *other))


def test_no_salt_differs_from_empty_salt() -> None:
    assert first_link_seed("m", None) != first_link_seed("m", "")


def test_continuing_a_chain_equals_hashing_the_whole() -> None:
    toks = list(range(100))
    whole = prompt_keys(toks, 16, "m")
    assert chain_keys(toks[32:96], 16, whole[1]) == whole[2:6]


def test_block_boundaries_matter() -> None:
    assert prompt_keys([1, 2, 3, 4], 2, "m") != prompt_keys([1, 2, 3, 4], 4, "m")[:1]
    assert prompt_keys([1, 2], 2, "m") != prompt_keys([2, 1], 2, "m")


def test_cacheable_blocks_keeps_the_last_token_uncached() -> None:
    assert cacheable_blocks(96, 32) == 2
    assert cacheable_blocks(97, 32) == 3
    assert cacheable_blocks(103, 32) == 3
    assert cacheable_blocks(0, 32) == 0
    assert cacheable_blocks(1, 32) == 0
