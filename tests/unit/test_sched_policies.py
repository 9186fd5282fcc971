"""Filters and policies: properties of ``Scheduler.decide`` over generated fleets."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.config import SchedulingConfig
from router.errors import NoHealthyBackend
from router.scheduling import POLICIES, Saturated, Scheduler
from router.scheduling.filters import DEFAULT_FILTERS
from router.scheduling.load import band_limit, load_of
from router.scheduling.model import Candidate, RouteRequest
from router.types import BackendId, BlockKey

CFG = SchedulingConfig()


def cand(i: int, **kw: object) -> Candidate:
    fields: dict[str, object] = {"matched_blocks": 0, "in_flight": 0} | kw
    return Candidate(id=BackendId(f"http://10.0.0.{i}:8000"), **fields)  # type: ignore[arg-type]


def req(cacheable: int = 8, first: int = 1, **kw: object) -> RouteRequest:
    keys = tuple(BlockKey(first * 1000 + i) for i in range(cacheable + 1))
    fields: dict[str, object] = {
        "model": "m", "keys": keys, "prompt_tokens": (cacheable + 1) * 16, "block_size": 16,
        "cacheable_blocks": cacheable,
    } | kw
    return RouteRequest(**fields)  # type: ignore[arg-type]


candidate_st = st.fixed_dictionaries({
    "matched_blocks": st.integers(0, 40),
    "in_flight": st.integers(0, 60),
    "waiting": st.one_of(st.none(), st.integers(0, 30).map(float)),
    "kv_usage": st.one_of(st.none(), st.floats(0, 1)),
    "healthy": st.booleans(),
    "circuit_open": st.booleans(),
    "draining": st.booleans(),
    "serves_model": st.booleans(),
    "max_concurrency": st.one_of(st.none(), st.integers(1, 60)),
})
fleet_st = st.lists(candidate_st, min_size=1, max_size=10).map(
    lambda rows: [cand(i, **row) for i, row in enumerate(rows)])
request_st = st.builds(
    lambda c, first, session, idx: req(c, first, session=session, index_available=idx),
    st.integers(0, 32), st.integers(1, 10**6), st.one_of(st.none(), st.text(min_size=1, max_size=8)), st.booleans())


def passes(c: Candidate) -> bool:
    return all(f(c) for _, f in DEFAULT_FILTERS)


@settings(max_examples=150, deadline=None)
@given(fleet_st, request_st, st.sampled_from(POLICIES), st.integers(0, 2**32))
def test_decide_never_picks_a_filtered_out_replica(
    fleet: list[Candidate], request: RouteRequest, policy: str, seed: int
) -> None:
    sched = Scheduler(CFG, policy, random.Random(seed))
    ok = [c for c in fleet if passes(c)]
    if not ok:
        with pytest.raises(NoHealthyBackend) as err:
            sched.decide(request, fleet)
        assert err.value.retry_after is not None and err.value.retry_after > 0
        return
    d = sched.decide(request, fleet)
    assert d.backend in {c.id for c in ok}
    assert sorted(d.ranked) == sorted(c.id for c in ok) and d.ranked[0] == d.backend
    by_id = {c.id: c for c in fleet}
    assert d.matched_tokens == min(by_id[d.backend].matched_blocks, request.cacheable_blocks) * 16
    assert d.best_matched_tokens == max(min(c.matched_blocks, request.cacheable_blocks) for c in ok) * 16
    assert d.matched_tokens <= d.best_matched_tokens


@settings(max_examples=150, deadline=None)
@given(fleet_st, request_st, st.integers(0, 2**32))
def test_cache_aware_never_leaves_the_load_band(fleet: list[Candidate], request: RouteRequest, seed: int) -> None:
    ok = [c for c in fleet if passes(c)]
    if not ok:
        return
    d = Scheduler(CFG, "cache_aware", random.Random(seed)).decide(request, fleet)
    limit = band_limit(min(load_of(c) for c in ok), CFG.load_band, CFG.load_band_ratio)
    assert load_of({c.id: c for c in fleet}[d.backend]) <= limit
    if not request.index_available:
        assert d.reason == ("session" if request.session else "fallback")
    else:
        best = max(min(c.matched_blocks, request.cacheable_blocks) for c in ok)
        expected = "fallback" if best == 0 else "affinity" if d.matched_tokens == best * 16 else "load"
        assert d.reason == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=2, max_size=10), st.integers(0, 20), st.integers(1, 32))
def test_with_equal_load_the_longest_match_wins(matches: list[int], load: int, cacheable: int) -> None:
    fleet = [cand(i, matched_blocks=m, in_flight=load) for i, m in enumerate(matches)]
    d = Scheduler(CFG, "cache_aware", random.Random(0)).decide(req(cacheable), fleet)
    best = max(min(m, cacheable) for m in matches)
    assert d.matched_tokens == best * 16
    assert d.reason == ("affinity" if best > 0 else "fallback")


def test_hot_holder_spills_to_the_least_loaded_then_returns() -> None:
    sched = Scheduler(CFG, "cache_aware", random.Random(0))
    cold = [cand(i, in_flight=2) for i in range(1, 4)]
    # band limit = 2 + load_band 2 + ratio 0.25 * 2 = 4.5
    assert sched.decide(req(8), [cand(0, matched_blocks=8, in_flight=4), *cold]).reason == "affinity"
    holder = cand(0, matched_blocks=8, in_flight=5)
    d = sched.decide(req(8), [holder, *cold])
    assert d.backend != holder.id and d.reason == "load" and d.best_matched_tokens == 128
    assert d.ranked[-1] == holder.id  # still a retry target, last
    # the others caught up: the holder is back in the band and keeps its prefix
    warm = [cand(i, in_flight=4) for i in range(1, 4)]
    assert sched.decide(req(8), [holder, *warm]).backend == holder.id


def test_round_robin_cycles() -> None:
    fleet = [cand(i, in_flight=i * 7) for i in range(5)]
    sched = Scheduler(CFG, "round_robin", random.Random(0))
    picks = [sched.decide(req(), fleet).backend for _ in range(15)]
    assert Counter(picks) == {c.id: 3 for c in fleet}
    assert picks[:5] == picks[5:10] == picks[10:]


def test_least_load_picks_minimum_and_random_picks_everyone() -> None:
    fleet = [cand(0, in_flight=3), cand(1, in_flight=1, waiting=4.0), cand(2, in_flight=2)]
    assert Scheduler(CFG, "least_load", random.Random(0)).decide(req(), fleet).backend == fleet[2].id
    rnd = Scheduler(CFG, "random", random.Random(0))
    assert {rnd.decide(req(), fleet).backend for _ in range(60)} == {c.id for c in fleet}


def test_prefix_hash_stable_when_an_unrelated_replica_joins() -> None:
    fleet = [cand(i) for i in range(6)]
    sched = Scheduler(CFG, "prefix_hash", random.Random(0))
    before = [sched.decide(req(4, first=k), fleet).backend for k in range(1, 2001)]
    after = [sched.decide(req(4, first=k), [*fleet, cand(99)]).backend for k in range(1, 2001)]
    moved = sum(a != b for a, b in zip(before, after, strict=True))
    # Rendezvous moves only the keys the newcomer wins: about 1/7 of them.
    assert all(b == cand(99).id for a, b in zip(before, after, strict=True) if a != b)
    assert 0.08 * 2000 < moved < 0.22 * 2000
    assert len(set(before)) == 6


def test_prefix_hash_bounded_load_skips_a_hot_replica() -> None:
    sched = Scheduler(CFG, "prefix_hash", random.Random(0))
    fleet = [cand(i) for i in range(4)]
    home = sched.decide(req(4, first=7), fleet).backend
    hot = [cand(i, in_flight=10 if cand(i).id == home else 1) for i in range(4)]
    assert sched.decide(req(4, first=7), hot).backend != home


def test_fail_open_is_rendezvous_on_the_first_block_within_the_band() -> None:
    sched = Scheduler(CFG, "cache_aware", random.Random(0))
    fleet = [cand(i, in_flight=1) for i in range(5)]
    picks = {sched.decide(req(4, first=3, index_available=False), fleet).backend for _ in range(20)}
    assert len(picks) == 1  # same first block, same replica, every time, with no index
    # another router replica (another Scheduler, another RNG) agrees
    other = Scheduler(CFG, "cache_aware", random.Random(99))
    assert other.decide(req(4, first=3, index_available=False), fleet).backend in picks
    home = picks.pop()
    loaded = [cand(i, in_flight=20 if cand(i).id == home else 1) for i in range(5)]
    d = sched.decide(req(4, first=3, index_available=False), loaded)
    assert d.backend != home and d.reason == "fallback"
    spread = {sched.decide(req(4, first=k, index_available=False), fleet).backend for k in range(1, 200)}
    assert len(spread) == 5


def test_session_is_the_fail_open_key_and_otherwise_ignored() -> None:
    sched = Scheduler(CFG, "cache_aware", random.Random(0))
    fleet = [cand(i, in_flight=1) for i in range(4)]
    blind = {k: sched.decide(req(8, first=k, session="alice", index_available=False), fleet) for k in range(1, 30)}
    assert {d.reason for d in blind.values()} == {"session"}
    assert len({d.backend for d in blind.values()}) == 1  # every prompt of the session: one replica
    # with the index, the cache decides and the session is not a reason
    held = [cand(i, in_flight=1, matched_blocks=8 if i == 2 else 0) for i in range(4)]
    d = sched.decide(req(8, session="alice"), held)
    assert d.backend == held[2].id and d.reason == "affinity"


def test_no_backend_errors_say_down_or_full() -> None:
    sched = Scheduler(CFG, "cache_aware", random.Random(0))
    with pytest.raises(NoHealthyBackend, match="1 failed health"):
        sched.decide(req(), [cand(0, healthy=False)])
    with pytest.raises(Saturated):
        sched.decide(req(), [cand(0, in_flight=4, max_concurrency=4)])
    with pytest.raises(NoHealthyBackend, match="no replica serves"):
        sched.decide(req(), [])
    with pytest.raises(ValueError):
        sched.decide(req(), [cand(0)], policy="nope")
    with pytest.raises(ValueError):
        Scheduler(CFG, "nope", random.Random(0))


def test_a_hot_prefix_spreads_and_each_spill_becomes_a_holder() -> None:
    """One prefix, a burst of requests, nothing finishing: as the index records each dispatch
    (approximate mode), the holder keeps the prefix until it leaves the band, then the least
    loaded replica takes one and becomes a second holder, and so on: every replica ends up
    holding it and loads never differ by more than the band."""
    sched = Scheduler(CFG, "cache_aware", random.Random(5))
    in_flight = dict.fromkeys(range(6), 0)
    holds: set[int] = set()
    reasons: Counter[str] = Counter()
    for _ in range(120):
        fleet = [cand(i, in_flight=in_flight[i], matched_blocks=8 if i in holds else 0) for i in range(6)]
        d = sched.decide(req(8), fleet)
        pick = next(i for i in range(6) if cand(i).id == d.backend)
        reasons[d.reason] += 1
        in_flight[pick] += 1
        holds.add(pick)
        lo = min(in_flight.values())
        assert max(in_flight.values()) <= lo + 1 + CFG.load_band + CFG.load_band_ratio * lo
    assert holds == set(range(6))
    assert reasons["fallback"] == 1 and reasons["load"] == 5  # the first miss, then one spill per new holder
    assert reasons["affinity"] == 114


@settings(max_examples=200, deadline=None)
@given(c=candidate_st, cacheable=st.integers(0, 40), available=st.booleans(), session=st.sampled_from([None, "s"]))
def test_one_eligible_replica_gets_the_decision_the_full_path_gives(
        c: dict[str, object], cacheable: int, available: bool, session: str | None) -> None:
    """cache_aware skips its cost model when one replica is eligible; ``explain`` forces the
    full path, which must agree on everything but the per-replica scores."""
    one = [cand(1, **(c | {"healthy": True, "circuit_open": False, "draining": False, "serves_model": True,
                           "max_concurrency": None}))]
    assert passes(one[0])
    sched = Scheduler(CFG, "cache_aware", random.Random(0))
    fast = sched.decide(req(cacheable, index_available=available, session=session), one)
    full = sched.decide(req(cacheable, index_available=available, session=session, explain=True), one)
    assert (fast.backend, fast.ranked, fast.reason, fast.matched_tokens, fast.best_matched_tokens) == \
        (full.backend, full.ranked, full.reason, full.matched_tokens, full.best_matched_tokens)
    assert fast.scores == {} and bool(full.scores) == available  # the fail-open path scores nothing
