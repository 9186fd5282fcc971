"""The scheduling profile: run the weighted scorers, clamp, sum, rank with a random tie-break.

This is the whole scoring loop (llm-d's ``scheduler_profile`` in one page): weights come
from ``SchedulingConfig.weights`` by scorer name; a scorer with weight 0 is not run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from router.scheduling.model import Candidate, RouteRequest
from router.scheduling.scorers import SCORERS, Scorer


@dataclass(frozen=True, slots=True)
class Scored:
    candidate: Candidate
    total: float
    parts: dict[str, float]
    """Each scorer's clamped score (before weighting), by name, plus ``total``."""


def clamp(x: float) -> float:
    if math.isnan(x):
        return 0.0
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


class Profile:
    def __init__(self, weights: Mapping[str, float], scorers: Mapping[str, Scorer] = SCORERS) -> None:
        unknown = sorted(set(weights) - set(scorers))
        if unknown:
            raise ValueError(f"unknown scorer(s) in scheduling.weights: {unknown}; known: {sorted(scorers)}")
        bad = sorted(n for n, w in weights.items() if not (w >= 0 and math.isfinite(w)))
        if bad:
            raise ValueError(f"scheduling.weights must be finite and >= 0: {bad}")
        self.weights = dict(weights)
        self._active = [(name, scorers[name], w) for name, w in weights.items() if w > 0]

    def score(self, request: RouteRequest, candidates: Sequence[Candidate]) -> list[Scored]:
        columns = [(name, w, scorer(request, candidates)) for name, scorer, w in self._active]
        out: list[Scored] = []
        for i, c in enumerate(candidates):
            parts = {name: clamp(col[i]) for name, _, col in columns}
            total = sum(w * parts[name] for name, w, _ in columns)
            parts["total"] = total
            out.append(Scored(c, total, parts))
        return out

    def rank(self, request: RouteRequest, candidates: Sequence[Candidate], rng: random.Random) -> list[Scored]:
        """Best first; equal totals in random order (so ties spread instead of piling on one id)."""
        scored = self.score(request, candidates)
        keyed = [(-s.total, rng.random(), i) for i, s in enumerate(scored)]
        keyed.sort()
        return [scored[i] for _, _, i in keyed]
