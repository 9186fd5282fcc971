"""What "load" means to the scheduler, and the load band that bounds cache affinity.

load = requests in flight to the replica (from every router replica) + the engine's own
waiting queue when a fresh scrape says so. In-flight counts are exact and instant;
the engine queue adds what other clients of the engine put there.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.scheduling.model import Candidate


def load_of(c: Candidate) -> float:
    w = c.waiting
    return c.in_flight + w if w is not None and w > 0 else float(c.in_flight)


def band_limit(min_load: float, load_band: float, load_band_ratio: float) -> float:
    """The most load a replica may carry and still be preferred for its cache."""
    return min_load + load_band + load_band_ratio * min_load


def in_band(candidates: Sequence[Candidate], load_band: float, load_band_ratio: float) -> list[Candidate]:
    """Replicas within the band of the least loaded one (never empty for a non-empty input)."""
    if not candidates:
        return []
    loads = [load_of(c) for c in candidates]
    limit = band_limit(min(loads), load_band, load_band_ratio)
    if max(loads) <= limit:
        return list(candidates)
    return [c for c, ld in zip(candidates, loads, strict=True) if ld <= limit]
