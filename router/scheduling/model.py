"""What the scheduler decides from: a frozen snapshot, and what it decides: a Decision.

All I/O happens before (the index lookup and the fleet snapshot are gathered in one
step by the request pipeline); everything in ``router.scheduling`` is a plain
synchronous function of these values, with the RNG passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from router.types import BackendId, BlockKey


class Candidate(NamedTuple):
    """One replica that passed the filters' inputs, as of the snapshot.

    A NamedTuple rather than a frozen dataclass: the fleet builds one per replica for every
    request, and a tuple is built in a third of the time (0.9 vs 2.3 us here).
    """

    id: BackendId
    matched_blocks: int
    """Leading blocks of this prompt the index says the replica holds (0 if unknown)."""
    in_flight: int
    """From every router replica (local + shared), dispatch to end of stream."""
    waiting: float | None = None
    """Engine queue length; None when the scrape is missing or older than the staleness bound."""
    running: float | None = None
    kv_usage: float | None = None
    healthy: bool = True
    circuit_open: bool = False
    draining: bool = False
    serves_model: bool = True
    max_concurrency: int | None = None
    prefilling: int = 0
    """Of ``in_flight``, requests from this router not yet answered with a first byte."""
    prefill_tokens: int = 0
    """Their predicted uncached prompt tokens: the prefill work queued ahead of a new request."""
    prefill_elapsed_ms: float = 0.0
    """Time since the replica's current prefill began (0 when nothing is prefilling): work
    already done on what ``prefill_tokens`` counts."""
    slots: int | None = None
    """Requests the engine runs at once (learned from its /metrics when it queued some), None
    if unknown: one more in flight than that waits for a running request to finish."""


@dataclass(frozen=True, slots=True)
class RouteRequest:
    model: str
    keys: tuple[BlockKey, ...]
    prompt_tokens: int
    block_size: int
    cacheable_blocks: int
    """Leading blocks the engine could report cached (prompt_tokens - 1, whole blocks)."""
    session: str | None = None
    index_available: bool = True
    """False when the index could not answer (fail-open): route on load + rendezvous of the first block."""
    explain: bool = False
    """Fill ``Decision.scores`` with every scorer's part too (``/debug/route``); routing itself
    runs the scorers only where they break a tie."""


@dataclass(frozen=True, slots=True)
class Decision:
    backend: BackendId
    matched_tokens: int
    """Predicted cached tokens on the chosen replica (capped like the engine's report)."""
    best_matched_tokens: int
    """The most any candidate held: beyond matched_tokens it is the price of load balancing."""
    reason: str
    """affinity | load | fallback | session | round_robin | least_load | prefix_hash | random"""
    ranked: tuple[BackendId, ...]
    """Every eligible replica, best first; retries walk it after ``backend``."""
    scores: dict[BackendId, dict[str, float]] = field(default_factory=dict)
