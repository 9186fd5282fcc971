"""The time model ``cache_aware`` decides in: a replica's expected time to first token.

For one request and one replica, in milliseconds::

    queue   = prefill_ms_per_token * (uncached tokens of its requests still prefilling)
            + prefill_base_ms      * (its requests still prefilling)
            - min(elapsed, the token part of one of them)
            + running_ms           * (its requests past their first token)
    prefill = prefill_ms_per_token * (this prompt's tokens the replica does not hold)
            + prefill_base_ms
    ttft    = queue + prefill                     (the estimate, shown by /debug/route)
    cost    = queue + prefill_weight * prefill    (what is ranked, lowest first)

"Still prefilling" is what the fleet counts from dispatch to the first byte of the answer
(``Candidate.prefilling`` / ``Candidate.prefill_tokens``, from ``Fleet.acquire`` and
``Fleet.first_byte``). ``elapsed`` (``Candidate.prefill_elapsed_ms``) is the time since the
replica's current prefill began: the dispatch that found it idle, or the last first byte
while others wait (prefills take turns). A miss sent 20 ms ago has 4 ms left, not 24; without
this credit, replicas with one miss each look alike and the pick among them is a coin toss,
where round robin, always sending to the replica served longest ago, picks the one nearly
done. The credit is capped at the token part of one request's average prefill, so a replica
that is slower than the model never looks idle while it still owes a first byte
(the demo-fleet model, ``tests/unit/test_sched_demo_fleet.py``, 4 engines, 20 seeds: zero
reuse TTFT p99 41.8 -> 35.4 ms against round robin's 35.7, churn 33.3 -> 30.8). Matched blocks lower ``prefill`` (the prefill a cache hit saves);
every request already sent and not yet served raises ``queue`` (the queue affinity
builds). The lowest cost keeps a prefix on its holder exactly while the prefill it saves
outweighs the extra queue it waits behind: the trade NVIDIA Dynamo's KV router makes
(overlap-weighted prefill blocks + active blocks), in time rather than in request counts.
A request count cannot tell a queue of 600-token misses from a queue of 60-token hits; on
an engine whose prefills take turns on one compute timeline (vLLM; ``loadtest.engine.timing``)
that difference is the TTFT. ``prefill_weight`` (> 1) charges a miss for the requests that
will arrive behind its prefill: ranking by the request's own TTFT alone is greedy, and
spilling a conversation's next turn to an idle replica to save it a few milliseconds costs
that replica a whole prompt's prefill (and the next turns their hits).

Pure: no clock, no I/O. Only the ratios between the three costs change a decision (the
scale cancels out when replicas are compared), so defaults sized for one engine remain
sound for another of the same shape; the reasons for each default are in
``router.config.SchedulingConfig``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from router.scheduling.model import Candidate, RouteRequest


@dataclass(frozen=True, slots=True)
class PrefillCost:
    prefill_ms_per_token: float
    prefill_base_ms: float
    running_ms: float
    prefill_weight: float = 1.0

    def queue_ms(self, c: Candidate) -> float:
        """Time the replica needs before it can start this request's prefill."""
        prefilling = max(0, min(c.prefilling, c.in_flight))
        running = c.in_flight - prefilling
        work = self.prefill_ms_per_token * max(0, c.prefill_tokens)
        if prefilling and c.prefill_elapsed_ms > 0:
            work -= min(c.prefill_elapsed_ms, work / prefilling)
        return work + self.prefill_base_ms * prefilling + self.running_ms * running

    def prefill_ms(self, request: RouteRequest, matched_blocks: int) -> float:
        """This prompt's own prefill on a replica holding ``matched_blocks`` leading blocks."""
        uncached = max(0, request.prompt_tokens - matched_blocks * request.block_size)
        return self.prefill_ms_per_token * uncached + self.prefill_base_ms

    def costs(self, request: RouteRequest, candidates: Sequence[Candidate],
              matched: Sequence[int]) -> list[tuple[float, float, float]]:
        """(queue, prefill, cost) per candidate; ``matched`` is each one's capped matched blocks.

        cost = queue + ``prefill_weight`` * prefill: with a weight above 1 a miss also pays
        for the requests that will queue behind its prefill (they are not here to object)."""
        out = []
        for c, m in zip(candidates, matched, strict=True):
            q = self.queue_ms(c)
            p = self.prefill_ms(request, m)
            out.append((q, p, q + self.prefill_weight * p))
        return out
