"""Scorers: each rates every candidate in [0, 1], higher is better, and knows nothing else.

A scorer sees the request and the candidates (already filtered, already in the load
band) and returns one number per candidate, in order. It does not know its weight or
the other scorers: ``router.scheduling.profile`` clamps, weights and sums. Relative
scorers (load, queue) compare candidates with each other, so a constant added to every
replica's load changes nothing; absolute ones (prefix, kv_usage) do not need to.

Missing data is neutral, never a penalty: a replica whose engine metrics are stale
(``waiting``/``kv_usage`` is None) gets the middle score, so it neither wins nor loses
because a scrape was late.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from router.config import SchedulingConfig
from router.scheduling.model import Candidate, RouteRequest

Scorer = Callable[[RouteRequest, Sequence[Candidate]], list[float]]

NEUTRAL = 0.5


def prefix(request: RouteRequest, candidates: Sequence[Candidate]) -> list[float]:
    """Share of the prompt's cacheable blocks the replica already holds."""
    cacheable = request.cacheable_blocks
    if cacheable <= 0:
        return [0.0] * len(candidates)
    return [max(0, min(c.matched_blocks, cacheable)) / cacheable for c in candidates]


def _inverse_minmax(values: Sequence[float | None]) -> list[float]:
    """1 for the smallest known value, 0 for the largest, linear between; None -> neutral."""
    known = [v for v in values if v is not None]
    if not known:
        return [1.0] * len(values)
    lo, hi = min(known), max(known)
    if hi <= lo:
        return [1.0 if v is not None else NEUTRAL for v in values]
    span = hi - lo
    return [(hi - v) / span if v is not None else NEUTRAL for v in values]


def load(request: RouteRequest, candidates: Sequence[Candidate]) -> list[float]:
    """Requests in flight (every router replica's), relative to the other candidates."""
    return _inverse_minmax([float(c.in_flight) for c in candidates])


class BandLoad:
    """``load`` measured against the load band's width rather than the spread alone.

    The band already says how much more load is acceptable for a cache hit (``load_band +
    load_band_ratio * min``); one request more than a neighbour should cost a fraction of
    that, not the whole load weight. Plain min-max made a 1-request difference outweigh a
    50% prefix match: on the simulated fleet with half-shared prompts the band-scaled score
    raised the hit rate from 0.40 to 0.45 and cut TTFT p99 by a tenth, and changed nothing
    on the other workloads.
    """

    def __init__(self, load_band: float, load_band_ratio: float) -> None:
        self.load_band = load_band
        self.load_band_ratio = load_band_ratio

    def __call__(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[float]:
        values = [float(c.in_flight) for c in candidates]
        lo, hi = min(values, default=0.0), max(values, default=0.0)
        span = max(hi - lo, self.load_band + self.load_band_ratio * lo)
        if span <= 0:
            return [1.0] * len(values)
        return [(hi - v) / span for v in values]


def queue(request: RouteRequest, candidates: Sequence[Candidate]) -> list[float]:
    """The engine's waiting queue, relative to the others; ignored when stale or missing."""
    return _inverse_minmax([c.waiting for c in candidates])


def kv_usage(request: RouteRequest, candidates: Sequence[Candidate]) -> list[float]:
    """Free KV cache (1 - usage): a full cache evicts what a new prefix would need."""
    return [NEUTRAL if c.kv_usage is None else 1.0 - c.kv_usage for c in candidates]


SCORERS: dict[str, Scorer] = {"prefix": prefix, "load": load, "queue": queue, "kv_usage": kv_usage}
"""Every scorer by the name ``SchedulingConfig.weights`` uses, with default parameters."""


def scorers_for(config: SchedulingConfig) -> dict[str, Scorer]:
    """The scorers ``cache_aware`` runs: ``load`` scaled by the configured load band."""
    return SCORERS | {"load": BandLoad(config.load_band, config.load_band_ratio)}
