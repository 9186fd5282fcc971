"""cache_aware's time model: prefill saved against queue built, per request (``router.scheduling.cost``)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from router.config import SchedulingConfig
from router.scheduling import Scheduler
from router.scheduling.cost import PrefillCost
from router.scheduling.model import Candidate, RouteRequest
from router.types import BackendId, BlockKey

CFG = SchedulingConfig()
BLOCK = 16
PROMPT = 581  # the demo's shared_prefix prompts: a 512-token system prompt and a 64-token question
SYSTEM_BLOCKS = 32


def cand(i: int, **kw: object) -> Candidate:
    fields: dict[str, object] = {"matched_blocks": 0, "in_flight": 0} | kw
    return Candidate(id=BackendId(f"http://10.0.0.{i}:8000"), **fields)  # type: ignore[arg-type]


def req(group: int = 0, tokens: int = PROMPT) -> RouteRequest:
    keys = tuple(BlockKey(group * 1000 + i) for i in range(tokens // BLOCK))
    # explain: these tests read each replica's queue, prefill and cost (what /debug/route shows)
    return RouteRequest(model="m", keys=keys, prompt_tokens=tokens, block_size=BLOCK,
                        cacheable_blocks=(tokens - 1) // BLOCK, explain=True)


def prefilling_misses(i: int, n: int, **kw: object) -> Candidate:
    """A replica that was just sent ``n`` full misses and has answered none of them yet."""
    return cand(i, in_flight=n, prefilling=n, prefill_tokens=n * PROMPT, **kw)


def test_a_follower_queues_behind_one_miss_of_its_prefix_but_not_behind_two() -> None:
    """Approximate mode records a prompt's blocks at dispatch, so the followers of a new
    prefix see it held by a replica still prefilling it. A request count (in flight 1 vs 0)
    cannot say whether waiting there pays; the time model can: 24 ms of queue for a 21 ms
    saving (doubled for the work a miss puts in front of later requests) is worth it, 48 ms is not."""
    sched = Scheduler(CFG, "cache_aware", random.Random(0))
    one = sched.decide(req(), [prefilling_misses(0, 1, matched_blocks=SYSTEM_BLOCKS), cand(1)])
    assert one.backend == cand(0).id and one.reason == "affinity"
    two = sched.decide(req(), [prefilling_misses(0, 2, matched_blocks=SYSTEM_BLOCKS), cand(1)])
    assert two.backend == cand(1).id and two.reason == "load" and two.best_matched_tokens == 512
    s = two.scores[cand(0).id]
    assert s["queue_ms"] == 2 * (1.0 + 0.04 * PROMPT)
    assert s["prefill_ms"] == 1.0 + 0.04 * (PROMPT - 512)
    assert s["ttft_ms"] == s["queue_ms"] + s["prefill_ms"]
    assert s["cost_ms"] == s["queue_ms"] + CFG.prefill_weight * s["prefill_ms"]


def test_queued_hits_weigh_less_than_queued_misses_with_equal_counts() -> None:
    """Two replicas with 3 requests in flight each, both holding the prefix: the one whose
    queue is three cheap hits wins over the one with three misses ahead."""
    sched = Scheduler(CFG, "cache_aware", random.Random(0))
    hits = cand(0, matched_blocks=SYSTEM_BLOCKS, in_flight=3, prefilling=3, prefill_tokens=3 * (PROMPT - 512))
    misses = prefilling_misses(1, 3, matched_blocks=SYSTEM_BLOCKS)
    for order in ([hits, misses], [misses, hits]):
        assert sched.decide(req(), order).backend == hits.id


def test_a_cold_burst_spreads_the_misses_and_keeps_followers_with_their_prefix() -> None:
    """The demo's start: 16 requests of 8 groups arrive before any answer. Each dispatch is
    recorded (index and pending prefill) before the next decision, as the gateway does. The
    worst queued prefill must not exceed round robin's (which sends every replica 4 misses),
    and every group must be prefilled at most twice (a replica per follower would be RR)."""
    rng = random.Random(3)
    groups = [g for g in range(8) for _ in range(2)]
    rng.shuffle(groups)
    worst = {}
    for policy in ("round_robin", "cache_aware"):
        sched = Scheduler(CFG, policy, random.Random(1))
        holds: dict[int, set[int]] = {i: set() for i in range(4)}
        pend = dict.fromkeys(range(4), 0)
        count = dict.fromkeys(range(4), 0)
        prefilled: dict[int, int] = {}
        for g in groups:
            fleet = [cand(i, matched_blocks=SYSTEM_BLOCKS if g in holds[i] else 0, in_flight=count[i],
                          prefilling=count[i], prefill_tokens=pend[i]) for i in range(4)]
            d = sched.decide(req(g), fleet)
            i = next(j for j in range(4) if cand(j).id == d.backend)
            pend[i] += PROMPT - d.matched_tokens
            count[i] += 1
            if g not in holds[i]:
                prefilled[g] = prefilled.get(g, 0) + 1
            holds[i].add(g)
        worst[policy] = max(pend.values())
        if policy == "cache_aware":
            assert max(prefilled.values()) <= 2
            assert sum(prefilled.values()) < len(groups)
    assert worst["cache_aware"] <= worst["round_robin"]


def test_running_requests_cost_little_and_prefilling_ones_their_tokens() -> None:
    cost = PrefillCost(prefill_ms_per_token=0.04, prefill_base_ms=1.0, running_ms=0.25, prefill_weight=2.0)
    assert cost.queue_ms(cand(0, in_flight=8)) == 8 * 0.25
    assert cost.queue_ms(cand(0, in_flight=3, prefilling=1, prefill_tokens=100)) == 2 * 0.25 + 1.0 + 4.0
    # counts that raced (a first byte seen between snapshots) never go negative
    assert cost.queue_ms(cand(0, in_flight=1, prefilling=3, prefill_tokens=-5)) == 1.0
    assert cost.prefill_ms(req(tokens=160), matched_blocks=10) == 1.0


candidate_st = st.builds(
    lambda m, running, pending, tokens: {"matched_blocks": m, "in_flight": running + pending,
                                         "prefilling": pending, "prefill_tokens": tokens},
    st.integers(0, 40), st.integers(0, 20), st.integers(0, 6), st.integers(0, 5000))


@settings(max_examples=200, deadline=None)
@given(st.lists(candidate_st, min_size=1, max_size=8), st.integers(1, 640), st.integers(0, 2**32))
def test_the_pick_has_the_lowest_cost_in_the_band(rows: list[dict[str, int]], tokens: int, seed: int) -> None:
    fleet = [cand(i, **row) for i, row in enumerate(rows)]
    d = Scheduler(CFG, "cache_aware", random.Random(seed)).decide(req(tokens=tokens), fleet)
    costs = {b: s["cost_ms"] for b, s in d.scores.items()}
    assert d.backend in costs
    assert costs[d.backend] <= min(costs.values()) + 1e-6
    assert all(s["queue_ms"] >= 0 and s["prefill_ms"] > 0 for s in d.scores.values())


def test_a_miss_nearly_done_queues_less_than_one_just_sent() -> None:
    """Prefills take turns: a miss sent 20 ms ago has ~4 ms left. Among replicas with one miss
    each, the one that has worked longest wins (round robin's implicit advantage, made explicit)."""
    cost = PrefillCost(CFG.prefill_ms_per_token, CFG.prefill_base_ms, CFG.running_ms, CFG.prefill_weight)
    fresh = prefilling_misses(1, 1)
    worked = prefilling_misses(2, 1, prefill_elapsed_ms=20.0)
    assert cost.queue_ms(worked) == cost.queue_ms(fresh) - 20.0
    d = Scheduler(CFG, "cache_aware", random.Random(0)).decide(req(), [fresh, worked])
    assert d.backend == worked.id


@given(n=st.integers(1, 8), elapsed=st.floats(0, 10_000), tokens=st.integers(0, 50_000))
def test_the_elapsed_credit_never_exceeds_one_requests_share_of_the_token_work(
        n: int, elapsed: float, tokens: int) -> None:
    """A replica slower than the model keeps owing the base cost of each request and all but one
    request's share of the token work, however long its current prefill has run."""
    cost = PrefillCost(CFG.prefill_ms_per_token, CFG.prefill_base_ms, CFG.running_ms, CFG.prefill_weight)
    c = cand(1, in_flight=n, prefilling=n, prefill_tokens=tokens, prefill_elapsed_ms=elapsed)
    work = CFG.prefill_ms_per_token * tokens
    q = cost.queue_ms(c)
    assert q <= cost.queue_ms(c._replace(prefill_elapsed_ms=0.0)) + 1e-9
    assert q >= CFG.prefill_base_ms * n + work * (n - 1) / n - 1e-6


def test_a_holder_with_every_slot_taken_leaves_the_band_while_another_replica_has_one_free() -> None:
    """One request more than an engine runs at once waits for a whole answer to finish: more than
    any prefix saves. The slot count is learned from the engine's /metrics (``Candidate.slots``)."""
    sched = Scheduler(CFG, "cache_aware", random.Random(0))
    holder = cand(1, matched_blocks=SYSTEM_BLOCKS, in_flight=8, slots=8)
    other = cand(2, in_flight=7, slots=8)
    d = sched.decide(req(), [holder, other])
    assert (d.backend, d.reason, d.ranked) == (other.id, "load", (other.id, holder.id))
    # unknown slots, or a free one on the holder: the prefix wins as before
    assert sched.decide(req(), [holder._replace(slots=None), other]).backend == holder.id
    assert sched.decide(req(), [holder._replace(slots=9), other]).backend == holder.id
    # every replica full: nothing to avoid, affinity decides
    assert sched.decide(req(), [holder, other._replace(in_flight=8)]).backend == holder.id
