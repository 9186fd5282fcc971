"""Scheduling: pick the replica for one request from a frozen snapshot. Pure and synchronous.

The decision rule
-----------------
1. **Filters** (``filters``) drop replicas that cannot take the request: model not served,
   failing health probes, circuit open, draining, at their concurrency cap. Nobody left:
   ``NoHealthyBackend`` (``filters.Saturated`` when replicas exist but are all full).
2. **Load band** (``load``), a backstop in request counts: load = requests in flight (all
   router replicas) + the engine's waiting queue when freshly scraped. Only replicas with
   ``load <= min_load + load_band + load_band_ratio * min_load`` stay in the running.
3. **Time** (``cost``): each replica in the band gets an expected time to first token, in
   milliseconds: the prefill still queued there (predicted uncached tokens of the requests
   it has not answered yet, counted by the fleet from dispatch to first byte, less the time
   its current prefill has already run) plus a little
   per running request, plus this prompt's own uncached prefill (weighted ``prefill_weight``,
   as a miss also delays whoever comes next). The lowest wins: affinity is kept exactly
   while the prefill it saves outweighs the queue it builds. Equal estimates go to the
   longer match, then to the **scorers** (``scorers``, each in [0, 1]: prefix, load, queue,
   kv_usage; weighted and summed by the **profile**), then take turns (from a random start).
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
affinity at once, including those whose holder is idle. The time model decides per
request: a holder keeps a prefix while its queue, in milliseconds of prefill, is less than
what the hit saves; the band caps the request count a holder may carry above the least
loaded replica (``load_band + load_band_ratio * min_load``) in case the time model is
wrong about an engine. A hot prefix spills to another replica as soon as its queue costs
more than a miss there; that replica is then recorded as a second holder (the gateway
records keys at dispatch), so hot prefixes spread over as many replicas as their traffic
needs. With zero reuse every prompt is a miss everywhere and the rule is least queued prefill.

Why time and not request counts (docs/results.md)
-------------------------------------------------
A count cannot tell a queue of 600-token misses from a queue of 60-token hits. With a
count band alone the demo's shared-prefix and churn workloads had worse TTFT p99 than
round robin: a cold burst sent a brand-new prefix's followers to the replica still
prefilling it, behind several misses on one compute timeline.

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
