"""Figures of one run: latency percentiles, throughput, errors, hit rates, ceiling and load balance.

Pure functions of the records and the engines' usage, so reports and tests recompute
them from a saved JSON the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from loadtest.runner.client import RequestRecord
from loadtest.runner.engines import EngineUsage


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float | None]:
    if not values:
        empty: dict[str, float | None] = {f"p{q:g}": None for q in qs}
        empty["mean"] = None
        return empty
    arr = np.asarray(values, dtype=float)
    out: dict[str, float | None] = {f"p{q:g}": float(np.percentile(arr, q)) for q in qs}
    out["mean"] = float(arr.mean())
    return out


def balance(values: Sequence[float]) -> float | None:
    """max / mean across engines: 1.0 is perfect balance, N means one engine took everything."""
    if not values or sum(values) <= 0:
        return None
    return float(max(values) / (sum(values) / len(values)))


def _norm(url: str) -> str:
    return url.rstrip("/")


def per_engine_requests(records: Sequence[RequestRecord], engines: Sequence[EngineUsage],
                        urls: Sequence[str]) -> tuple[dict[str, float], str]:
    """Requests per engine, and where the figure came from (router header, direct target, engine counter)."""
    names = [_norm(u) for u in urls]
    if any(r.backend for r in records):
        counts = Counter(_norm(r.backend) for r in records if r.backend)
        return {u: float(counts.get(u, 0)) for u in names} | {
            u: float(c) for u, c in counts.items() if u not in names}, "router header"
    if names and all(_norm(r.url) in names for r in records) and len({_norm(r.url) for r in records}) > 1:
        counts = Counter(_norm(r.url) for r in records)
        return {u: float(counts.get(u, 0)) for u in names}, "direct target"
    if engines and all(e.requests is not None for e in engines):
        return {_norm(e.url): float(e.requests or 0.0) for e in engines}, "engine counter"
    return {}, "unknown"


def summarize(records: Sequence[RequestRecord], engines: Sequence[EngineUsage], engine_urls: Sequence[str],
              wall_s: float, ceiling_rate: float | None) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    errors = Counter(r.error or "unknown" for r in records if not r.ok)
    with_usage = [r for r in ok if r.prompt_tokens is not None]
    prompt = sum(r.prompt_tokens or 0 for r in with_usage)
    cached = sum(r.cached_tokens or 0 for r in with_usage)
    completion = sum(r.completion_tokens or 0 for r in with_usage)
    queries = sum(e.queries for e in engines)
    hits = sum(e.hits for e in engines)
    hit_usage = cached / prompt if prompt else None
    reqs, source = per_engine_requests(records, engines, engine_urls)
    busy = {_norm(e.url): e.busy for e in engines}
    predicted = [r for r in with_usage if r.matched_tokens is not None]
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": dict(errors),
        "error_rate": (len(records) - len(ok)) / len(records) if records else 0.0,
        "wall_s": wall_s,
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else 0.0,
        "output_tokens_per_s": completion / wall_s if wall_s > 0 else 0.0,
        "ttft_s": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "e2e_s": percentiles([r.e2e_s for r in ok if r.e2e_s is not None]),
        "itl_s": percentiles([x for r in ok for x in r.itl_s]),
        "late_s": percentiles([r.late_s for r in records if r.late_s is not None]),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "completion_tokens": completion,
        "usage_coverage": len(with_usage) / len(ok) if ok else 0.0,
        "hit_rate_usage": hit_usage,
        "hit_rate_counters": hits / queries if queries else None,
        "ceiling": ceiling_rate,
        "of_ceiling": hit_usage / ceiling_rate if hit_usage is not None and ceiling_rate else None,
        # The router's prediction (x-cache-router-matched-tokens) against what the engine then reported:
        # a request whose prediction exceeds the engine's cached tokens is a stale hit.
        "predicted_requests": len(predicted),
        "predicted_tokens": sum(r.matched_tokens or 0 for r in predicted),
        "predicted_cached_tokens": sum(r.cached_tokens or 0 for r in predicted),
        "stale_predictions": sum(1 for r in predicted if (r.matched_tokens or 0) > (r.cached_tokens or 0)),
        "engine_requests": reqs,
        "engine_requests_source": source,
        "engine_busy": busy,  # mean requests running + waiting on each engine, sampled during the run
        "engine_busy_share": {u: b / sum(busy.values()) for u, b in busy.items()} if sum(busy.values()) else {},
        "load_balance": balance(list(reqs.values())),
        "busy_balance": balance(list(busy.values())),
    }
