"""Large fleets: cache_aware scores only a shortlist (router.scheduling.shortlist), and picks
exactly what scoring the whole fleet would pick. The cost of both is printed (``-s``)."""

from __future__ import annotations

import random
import time

from router.config import SchedulingConfig
from router.scheduling import Scheduler
from router.scheduling.model import Candidate, RouteRequest
from router.scheduling.shortlist import SCORE_ALL_UP_TO, shortlist
from router.types import BackendId, BlockKey

REQ = RouteRequest(model="m", keys=tuple(BlockKey(k) for k in range(125)), prompt_tokens=2005,
                   block_size=16, cacheable_blocks=125)


def fleet(rng: random.Random, n: int) -> list[Candidate]:
    """Distinct loads and matches, so the best replica is unique (no tie-break decides)."""
    loads = rng.sample(range(4 * n), n)
    out = []
    for i in range(n):
        held = rng.random() < 0.05
        out.append(Candidate(
            id=BackendId(f"http://r{i:04d}"), matched_blocks=rng.randint(1, 125) if held else 0,
            in_flight=loads[i] // 4, waiting=None, healthy=rng.random() > 0.05, circuit_open=rng.random() < 0.02,
            prefilling=min(loads[i] // 4, rng.randint(0, 2)), prefill_tokens=loads[i] * 37))
    return out


def test_shortlisted_pick_equals_the_whole_fleets() -> None:
    rng = random.Random(7)
    same = 0
    for trial in range(150):
        cands = fleet(rng, rng.choice([40, 200, 1000]))
        full = Scheduler(SchedulingConfig(), "cache_aware", random.Random(trial)).decide(REQ, cands)
        short = Scheduler(SchedulingConfig(), "cache_aware", random.Random(trial)).decide(REQ, shortlist(cands))
        same += full.backend == short.backend
        assert short.matched_tokens == full.matched_tokens
    assert same == 150


def test_small_fleets_are_scored_whole_and_nobody_eligible_keeps_the_error() -> None:
    rng = random.Random(1)
    small = fleet(rng, SCORE_ALL_UP_TO)
    assert shortlist(small) is small
    down = [c._replace(healthy=False) for c in fleet(rng, 100)]
    assert shortlist(down) == down  # the scheduler sees them all and says why nobody passed


def test_cost_of_a_decision_at_1000_replicas() -> None:
    # A balanced fleet (every replica within the load band): the case where all are scored.
    cands = [Candidate(id=BackendId(f"http://r{i:04d}"), matched_blocks=100 if i < 3 else 0, in_flight=i % 5,
                       waiting=0.0, kv_usage=0.3) for i in range(1000)]
    sched = Scheduler(SchedulingConfig(), "cache_aware", random.Random(0))
    timings = {}
    for name, pick in (("whole fleet", lambda: sched.decide(REQ, cands)),
                       ("shortlist", lambda: sched.decide(REQ, shortlist(cands)))):
        t0 = time.perf_counter()
        for _ in range(20):
            pick()
        timings[name] = (time.perf_counter() - t0) / 20 * 1e6
    print("\n1000 replicas, one cache_aware decision: " + ", ".join(f"{k} {v:,.0f} µs" for k, v in timings.items()))
    assert len(shortlist(cands)) <= 3 * 16
