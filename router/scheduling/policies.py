"""Routing policies: how one replica is picked from the eligible ones.

``cache_aware`` is the product; ``round_robin``, ``least_load``, ``prefix_hash`` and
``random`` are the baselines users compare it with (and the experiment's baseline arm),
run on the same code path after the same filters. Every policy returns a full
``Decision``: the pick, the ranked list retries walk, and the predicted matched tokens.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Protocol

from router.config import SchedulingConfig
from router.scheduling import rendezvous
from router.scheduling.cost import PrefillCost
from router.scheduling.load import in_band, load_of
from router.scheduling.model import Candidate, Decision, RouteRequest
from router.scheduling.profile import Profile, Rotation
from router.scheduling.scorers import scorers_for
from router.types import BackendId


class Policy(Protocol):
    name: str

    def decide(self, request: RouteRequest, eligible: list[Candidate], rng: random.Random) -> Decision: ...


def matched_blocks(request: RouteRequest, c: Candidate) -> int:
    """Blocks the engine could report cached: never more than the prompt's cacheable blocks."""
    return max(0, min(c.matched_blocks, request.cacheable_blocks))


def best_matched(request: RouteRequest, eligible: Sequence[Candidate]) -> int:
    # Over the eligible replicas only: blocks on a replica that could not take the request
    # (down, draining, full) are not savings that routing gave away.
    cap = request.cacheable_blocks
    return max(0, max(min(c.matched_blocks, cap) for c in eligible))


def decision(
    request: RouteRequest,
    ranked: Sequence[Candidate],
    reason: str,
    eligible: Sequence[Candidate],
    scores: dict[BackendId, dict[str, float]] | None = None,
    best: int | None = None,
) -> Decision:
    if best is None:
        best = best_matched(request, eligible)
    pick = ranked[0]
    return Decision(
        backend=pick.id,
        matched_tokens=matched_blocks(request, pick) * request.block_size,
        best_matched_tokens=best * request.block_size,
        reason=reason,
        ranked=tuple(c.id for c in ranked),
        scores=scores or {},
    )


def by_load(candidates: Sequence[Candidate], ties: Rotation) -> list[Candidate]:
    """Least loaded first, equal loads taking turns."""
    if len(candidates) <= 1:
        return list(candidates)
    keyed = sorted(zip((load_of(c) for c in candidates), ties.keys(candidates), range(len(candidates)), strict=True))
    return [candidates[i] for _, _, i in keyed]


def _full(c: Candidate) -> bool:
    return c.slots is not None and c.in_flight >= c.slots


def _with_free_slots(band: list[Candidate]) -> list[Candidate]:
    """``band`` without its replicas that have no free running slot, unless all are full."""
    if not any(c.slots is not None for c in band):
        return band
    free = [c for c in band if not _full(c)]
    return free if free and len(free) < len(band) else band


class CacheAware:
    """The lowest expected time to first token (``cost``) within a load band around the least loaded replica."""

    name = "cache_aware"

    def __init__(self, config: SchedulingConfig, rng: random.Random) -> None:
        self.config = config
        self.profile = Profile(config.weights, scorers_for(config))
        self.cost = PrefillCost(config.prefill_ms_per_token, config.prefill_base_ms, config.running_ms,
                                config.prefill_weight)
        self._ties = Rotation(rng)
        self._rest_ties = Rotation(rng)  # ordering retry targets must not skip anyone's turn

    def decide(self, request: RouteRequest, eligible: list[Candidate], rng: random.Random) -> Decision:
        if len(eligible) == 1 and not request.explain:
            # Nothing to weigh (one replica serves the model, or one passed the filters): the
            # decision and its reason as the full path would give them, without the cost
            # model, the band and the sort (a decision measured alone: 12.0 -> 4.3 µs).
            best = best_matched(request, eligible)
            if not request.index_available:
                reason = "session" if request.session else "fallback"
            else:
                reason = "affinity" if best else "fallback"
            return decision(request, eligible, reason, eligible, None, best)
        band = in_band(eligible, self.config.load_band, self.config.load_band_ratio)
        if len(band) > 1:
            # A replica whose running slots are all taken makes a new request wait for one of
            # them to finish (a whole answer's decode), which no prefill saving outweighs:
            # while some replica in the band has a free slot, the full ones leave it. With 16
            # clients on 2 engines of 8 slots, affinity that put a 9th request on a holder
            # cost shared prefix a TTFT p99 of 100 ms against the balancers' 31 (docs/results.md).
            band = _with_free_slots(band)
        rest: list[Candidate] = []
        if len(band) < len(eligible):
            band_ids = {c.id for c in band}
            rest = by_load([c for c in eligible if c.id not in band_ids], self._rest_ties)
        if not request.index_available:
            # Fail-open: affinity without an index. Every router replica maps the same
            # session, else the same first block, to the same replica; the band still bounds load.
            if request.session:
                ordered, reason = rendezvous.order(band, rendezvous.session_key(request.session)), "session"
            else:
                reason = "fallback"
                ordered = rendezvous.order(band, request.keys[0]) if request.keys else by_load(band, self._ties)
            return decision(request, ordered + rest, reason, eligible)
        # With the index, a session changes nothing: the index already remembers where the
        # conversation went (its blocks were recorded at dispatch), and more precisely. On
        # the simulated fleet (tests/unit/test_sched_simulation.py, multi-turn) a session
        # hash that overrode cache and load cut the hit rate from 0.42 to 0.32 and lifted
        # TTFT p99 above least_load's; as a mere tie-break it still cost 10-20% of p99 at 90%
        # load against taking turns.
        # The lowest expected TTFT wins (``cost``: prefill saved against queue built); equal
        # estimates go to the longer match, then to the profile's scorers, then take turns.
        matched = [matched_blocks(request, c) for c in band]
        est = self.cost.costs(request, band, matched)
        ties = self._ties.keys(band)
        first = [(round(k, 6), -m) for (_, _, k), m in zip(est, matched, strict=True)]
        # The scorers only break ties of (cost, match): skip them when there are none (the
        # usual case with one replica, or with replicas whose queues differ), unless asked to
        # explain. About half of a one-replica decision's CPU.
        scored = self.profile.score(request, band) if request.explain or len(set(first)) < len(first) else None
        totals = [-s.total for s in scored] if scored is not None else [0.0] * len(band)
        order = sorted(range(len(band)), key=lambda i: (first[i], totals[i], ties[i]))
        ranked = [band[i] for i in order]
        best = best_matched(request, eligible)
        mine = matched[order[0]]
        reason = "fallback" if best == 0 else "affinity" if mine == best else "load"
        scores = None
        if request.explain:  # only /debug/route reads them
            parts: list[dict[str, float]] = [s.parts for s in scored] if scored is not None else [{} for _ in band]
            scores = {c.id: {**part, "queue_ms": q, "prefill_ms": p, "ttft_ms": q + p, "cost_ms": k}
                      for c, part, (q, p, k) in zip(band, parts, est, strict=True)}
        return decision(request, ranked + rest, reason, eligible, scores, best)


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def decide(self, request: RouteRequest, eligible: list[Candidate], rng: random.Random) -> Decision:
        ordered = sorted(eligible, key=lambda c: c.id)
        i = self._next % len(ordered)
        self._next += 1
        return decision(request, ordered[i:] + ordered[:i], self.name, eligible)


class LeastLoad:
    name = "least_load"

    def __init__(self, rng: random.Random) -> None:
        self._ties = Rotation(rng)

    def decide(self, request: RouteRequest, eligible: list[Candidate], rng: random.Random) -> Decision:
        return decision(request, by_load(eligible, self._ties), self.name, eligible)


class PrefixHash:
    """Consistent (rendezvous) hashing of the prefix with bounded load.

    The key is the chained key of the first ``prefix_hash_blocks`` blocks. Bounded load
    as in Mirrokni et al. (2018): walking the key's replica order, a replica is skipped
    while taking the request would lift it above ``ceil(factor * (total load + 1) / n)``;
    at least one replica is always under that cap, so a pick always exists.
    """

    name = "prefix_hash"

    def __init__(self, config: SchedulingConfig, rng: random.Random) -> None:
        self.factor = config.prefix_hash_load_factor
        self.blocks = config.prefix_hash_blocks
        self._ties = Rotation(rng)

    def decide(self, request: RouteRequest, eligible: list[Candidate], rng: random.Random) -> Decision:
        if not request.keys:
            return decision(request, by_load(eligible, self._ties), self.name, eligible)
        key = request.keys[min(self.blocks, len(request.keys)) - 1]
        ordered = rendezvous.order(eligible, key)
        loads = [load_of(c) for c in ordered]
        cap = math.ceil(self.factor * (sum(loads) + 1) / len(ordered))
        pick = next((i for i, ld in enumerate(loads) if ld + 1 <= cap), loads.index(min(loads)))
        return decision(request, [ordered[pick], *ordered[:pick], *ordered[pick + 1 :]], self.name, eligible)


class Random:
    name = "random"

    def decide(self, request: RouteRequest, eligible: list[Candidate], rng: random.Random) -> Decision:
        ordered = list(eligible)
        rng.shuffle(ordered)
        return decision(request, ordered, self.name, eligible)


def make_policies(config: SchedulingConfig, rng: random.Random) -> dict[str, Policy]:
    return {
        "cache_aware": CacheAware(config, rng),
        "round_robin": RoundRobin(),
        "least_load": LeastLoad(rng),
        "prefix_hash": PrefixHash(config, rng),
        "random": Random(),
    }
