"""Large fleets: the few replicas worth a full scoring.

``cache_aware`` scores every candidate in Python (scorers, the time model, the band): about
9 µs per replica, so 6 ms per request at 1,000 replicas. The pick is always a replica that
holds part of the prompt (a hit saves prefill) or one of the least loaded (the least queue):
a replica that holds nothing and carries more than the lightest ones can only lose to them.
So above ``SCORE_ALL_UP_TO`` eligible replicas, only the ``HOLDERS`` longest matches and the
``LIGHTEST`` by load and by queued prefill are scored; selecting them is a few C-level passes
(``heapq``). The decision's ranking, which retries walk, then covers that shortlist.
"""

from __future__ import annotations

import heapq
from operator import attrgetter

from router.scheduling.filters import eligible
from router.scheduling.load import load_of
from router.scheduling.model import Candidate

SCORE_ALL_UP_TO = 32
HOLDERS = 16
LIGHTEST = 16

_matched = attrgetter("matched_blocks")
_queued_prefill = attrgetter("prefill_tokens")


def shortlist(candidates: list[Candidate]) -> list[Candidate]:
    """``candidates`` themselves when few (or none eligible: the scheduler names the error)."""
    if len(candidates) <= SCORE_ALL_UP_TO:
        return candidates
    ok = eligible(candidates)
    if len(ok) <= SCORE_ALL_UP_TO:
        return ok or candidates
    holders = heapq.nlargest(HOLDERS, (c for c in ok if c.matched_blocks > 0), key=_matched)
    light = heapq.nsmallest(LIGHTEST, ok, key=load_of)
    idle = heapq.nsmallest(LIGHTEST, ok, key=_queued_prefill)
    return list(dict.fromkeys([*holders, *light, *idle]))
