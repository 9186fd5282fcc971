"""Scheduling: pick the replica for one request from a frozen snapshot. Pure and synchronous.

The decision rule
-----------------
1. **Filters** (``filters``) drop replicas that cannot take the request: model not served,
   failing health probes, circuit open, draining, at their concurrency cap. Nobody left:
   ``NoHealthyBackend`` (``filters.Saturated`` when replicas exist but are all full).
2. **Load band** (``load``): load = requests in flight (all router replicas) + the engine's
   waiting queue when freshly scraped. Only replicas with
   ``load <= min_load + load_band + load_band_ratio * min_load`` stay in the running.
3. **Scorers** (``scorers``), each in [0, 1]: prefix (matched / cacheable blocks), load
   (in flight, relative to the others, on the scale of the band's width), queue, kv_usage;
   the **profile** (``profile``) clamps, weights them from ``SchedulingConfig.weights``,
   sums, and equal replicas take turns (from a random start). The best in the band wins.
4. The decision says why: ``affinity`` (the pick holds the most matched blocks of any
   eligible replica), ``load`` (a replica with more was outside the band or outscored),
   ``fallback`` (nothing matched, or the index was unavailable: then the band is ordered
   by rendezvous hashing of the prompt's first block key, affinity without an index),
   ``session`` (the index was unavailable and the request named a session: the session id
   replaces the first block as the rendezvous key). With the index, a session changes
   nothing: the index already remembers where the conversation went, more precisely, and
   the simulated fleet showed a session override losing hit rate and TTFT p99.

Why no fleet-wide "is anyone hot?" gate
---------------------------------------
Routers that switch between "cache mode" and "balance mode" on a fleet-wide imbalance
threshold fail both ways: below the threshold one hot prefix piles onto one replica and
its queue (TTFT p99) grows until the switch flips; above it, every request loses its
affinity at once, including those whose holder is idle. The band decides per request:
affinity is kept exactly when its holder is within a bounded distance of the least
loaded replica, so the worst queue cache_aware can build is ``load_band +
load_band_ratio * min_load`` above least_load's, at every load level, and a hot prefix
spills over to the least loaded replica as soon as its holder leaves the band. That
replica is then recorded as a second holder (the gateway records keys after dispatch), so
hot prefixes spread over as many replicas as their traffic needs. With zero reuse all
prefix scores are 0 and the rule is least-load within the band.

Baselines (``round_robin``, ``least_load``, ``prefix_hash``, ``random``) run after the
same filters, so an experiment compares policies and nothing else.
"""

from __future__ import annotations

import random

from router.config import SchedulingConfig
from router.scheduling.filters import Saturated, eligible, no_backend_error
from router.scheduling.model import Candidate, Decision, RouteRequest
from router.scheduling.policies import Policy, make_policies

POLICIES = ("cache_aware", "round_robin", "least_load", "prefix_hash", "random")

__all__ = ["POLICIES", "Candidate", "Decision", "RouteRequest", "Saturated", "Scheduler"]


class Scheduler:
    """``decide`` picks a replica; one instance per router, shared by every request."""

    def __init__(self, config: SchedulingConfig, policy: str, rng: random.Random) -> None:
        self.config = config
        self._policies: dict[str, Policy] = make_policies(config, rng)
        if policy not in self._policies:
            raise ValueError(f"unknown policy {policy!r}; known: {sorted(self._policies)}")
        self.policy = policy
        self._rng = rng

    def decide(self, request: RouteRequest, candidates: list[Candidate], *, policy: str | None = None) -> Decision:
        """The decision for ``request``; ``policy`` overrides the default (experiment arm).

        Raises ``NoHealthyBackend`` (or its subclass ``Saturated``) when no candidate passes
        the filters, and ValueError for an unknown policy name.
        """
        chosen = self._policies.get(policy or self.policy)
        if chosen is None:
            raise ValueError(f"unknown policy {policy!r}; known: {sorted(self._policies)}")
        ok = eligible(candidates)
        if not ok:
            raise no_backend_error(request.model, candidates)
        return chosen.decide(request, ok, self._rng)
