"""cache_aware runs its scorers only where they break a tie of (cost, match), unless the request
asks to be explained (``/debug/route``): either way the decision is the same."""

from __future__ import annotations

import dataclasses
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from router.config import SchedulingConfig
from router.scheduling import Scheduler
from router.scheduling.model import Candidate, RouteRequest
from router.types import BackendId, BlockKey

REQ = RouteRequest(model="m", keys=tuple(BlockKey(k) for k in range(40)), prompt_tokens=645,
                   block_size=16, cacheable_blocks=40)

row = st.fixed_dictionaries({
    "matched_blocks": st.sampled_from([0, 0, 10, 40]), "in_flight": st.integers(0, 4),
    "waiting": st.sampled_from([None, 0.0, 2.0]), "kv_usage": st.sampled_from([None, 0.2, 0.9]),
    "prefilling": st.integers(0, 1), "prefill_tokens": st.sampled_from([0, 0, 300])})


@settings(max_examples=300, deadline=None)
@given(st.lists(row, min_size=1, max_size=8), st.integers(0, 2**32))
def test_explained_and_plain_decisions_agree(rows: list[dict[str, object]], seed: int) -> None:
    fleet = [Candidate(id=BackendId(f"http://r{i}"), **r) for i, r in enumerate(rows)]  # type: ignore[arg-type]
    plain = Scheduler(SchedulingConfig(), "cache_aware", random.Random(seed)).decide(REQ, fleet)
    told = Scheduler(SchedulingConfig(), "cache_aware", random.Random(seed)).decide(
        dataclasses.replace(REQ, explain=True), fleet)
    assert (plain.backend, plain.ranked, plain.reason) == (told.backend, told.ranked, told.reason)
    if plain.reason != "fallback" or plain.best_matched_tokens:
        # explained: every scorer's part beside the time model's; plain: at least the time model
        assert all({"prefix", "load", "cost_ms"} <= set(s) for s in told.scores.values())
        assert all("cost_ms" in s for s in plain.scores.values())
