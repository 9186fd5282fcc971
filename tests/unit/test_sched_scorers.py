"""Scorers and the profile: every score in [0, 1], each scorer orders replicas the right way."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.config import SchedulingConfig
from router.scheduling.model import Candidate, RouteRequest
from router.scheduling.profile import Profile, Rotation, clamp
from router.scheduling.scorers import NEUTRAL, SCORERS, BandLoad, kv_usage, load, prefix, queue, scorers_for
from router.types import BackendId, BlockKey


def cand(i: int, **kw: object) -> Candidate:
    fields: dict[str, object] = {"matched_blocks": 0, "in_flight": 0} | kw
    return Candidate(id=BackendId(f"http://10.0.0.{i}:8000"), **fields)  # type: ignore[arg-type]


def req(cacheable: int = 8, **kw: object) -> RouteRequest:
    keys = tuple(BlockKey(i + 1) for i in range(cacheable + 1))
    fields: dict[str, object] = {
        "model": "m", "keys": keys, "prompt_tokens": (cacheable + 1) * 16, "block_size": 16,
        "cacheable_blocks": cacheable,
    } | kw
    return RouteRequest(**fields)  # type: ignore[arg-type]


maybe_float = st.one_of(st.none(), st.floats(min_value=0, max_value=1e6, allow_nan=False))
candidate_st = st.builds(
    lambda m, f, w, kv: (m, f, w, kv),
    st.integers(min_value=-5, max_value=10_000),
    st.integers(min_value=0, max_value=10_000),
    maybe_float,
    st.one_of(st.none(), st.floats(min_value=0, max_value=1)),
)


@given(st.lists(candidate_st, min_size=1, max_size=12), st.integers(min_value=0, max_value=5000))
def test_every_scorer_stays_in_unit_interval(raw: list[tuple[int, int, float | None, float | None]], cacheable: int) -> None:
    cands = [cand(i, matched_blocks=m, in_flight=f, waiting=w, kv_usage=kv) for i, (m, f, w, kv) in enumerate(raw)]
    r = req(cacheable)
    for name, scorer in [*SCORERS.items(), ("band_load", scorers_for(SchedulingConfig())["load"])]:
        scores = scorer(r, cands)
        assert len(scores) == len(cands), name
        assert all(0.0 <= s <= 1.0 for s in scores), (name, scores)
    for s in Profile({"prefix": 2, "load": 1, "queue": 0.5, "kv_usage": 0.25}).score(r, cands):
        assert 0.0 <= s.total <= 3.75
        assert all(0.0 <= v <= 1.0 for k, v in s.parts.items() if k != "total")


def test_prefix_is_matched_over_cacheable_and_capped() -> None:
    scores = prefix(req(8), [cand(0, matched_blocks=0), cand(1, matched_blocks=4), cand(2, matched_blocks=20)])
    assert scores == [0.0, 0.5, 1.0]
    assert prefix(req(0), [cand(0, matched_blocks=3)]) == [0.0]


def test_load_and_queue_prefer_the_less_loaded() -> None:
    cands = [cand(0, in_flight=10, waiting=4), cand(1, in_flight=2, waiting=0), cand(2, in_flight=6, waiting=None)]
    assert load(req(), cands) == [0.0, 1.0, 0.5]
    assert queue(req(), cands) == [0.0, 1.0, NEUTRAL]  # stale scrape: neutral, not a penalty
    assert queue(req(), [cand(0, waiting=None), cand(1, waiting=None)]) == [1.0, 1.0]


def test_band_load_weighs_a_difference_against_the_band_width() -> None:
    band = BandLoad(load_band=2.0, load_band_ratio=0.25)
    # one request apart at load 10: a tenth-ish of the scale (2 + 2.5), not all of it
    assert band(req(), [cand(0, in_flight=10), cand(1, in_flight=11)]) == pytest.approx([1 / 4.5, 0.0])
    # far apart: plain min-max
    assert band(req(), [cand(0, in_flight=0), cand(1, in_flight=20)]) == [1.0, 0.0]
    assert BandLoad(0.0, 0.0)(req(), [cand(0), cand(1)]) == [1.0, 1.0]


def test_kv_usage_prefers_free_cache() -> None:
    assert kv_usage(req(), [cand(0, kv_usage=0.9), cand(1, kv_usage=0.1), cand(2)]) == pytest.approx([0.1, 0.9, NEUTRAL])


def test_profile_clamps_weights_and_ranks_with_random_ties() -> None:
    assert clamp(float("nan")) == 0.0 and clamp(-1) == 0.0 and clamp(3) == 1.0
    p = Profile({"prefix": 2.0, "load": 1.0})
    r = req(8)
    c = [cand(0, matched_blocks=8, in_flight=5), cand(1, matched_blocks=0, in_flight=1)]
    ranked = p.rank(r, c, Rotation(random.Random(0)).keys(c))
    assert ranked[0].candidate.id == c[0].id and ranked[0].total == pytest.approx(2.0)
    assert ranked[1].total == pytest.approx(1.0)
    # identical replicas take turns, from a start that depends on the RNG
    twins = [cand(0), cand(1), cand(2)]
    starts = set()
    for seed in range(20):
        ties = Rotation(random.Random(seed))
        picks = [p.rank(r, twins, ties.keys(twins))[0].candidate.id for _ in range(9)]
        assert picks[:3] == picks[3:6] == picks[6:] and len(set(picks)) == 3
        starts.add(picks[0])
    assert len(starts) == 3


def test_profile_rejects_unknown_or_negative_weights() -> None:
    with pytest.raises(ValueError, match="unknown scorer"):
        Profile({"prefixx": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        Profile({"prefix": -1.0})
