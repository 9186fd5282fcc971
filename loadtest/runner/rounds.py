"""Several rounds of one arm as one result: ``merge_rounds``, and the per-round p99 a verdict rests on.

Why rounds: a p99 over a few hundred requests is the 4th-slowest request, so one stall of
the shared machine (the lead's benchmarks, a collector pause in a router) that hits the
six requests in flight decides it, whichever policy was running. Arms run interleaved
round by round (each round: every arm once, the order rotated), so a slow stretch of the
machine lands on every arm alike, and a verdict can rest on the median of each arm's
per-round p99s, with the spread shown beside it, instead of on one event.

The merged result keeps every request (``RequestRecord.round`` says which round, ``start_s``
runs on across rounds), sums the engines' counters, weights the ceiling by prompt tokens,
and adds ``rounds`` and ``ttft_p99_rounds`` / ``ttft_p99_median`` to the summary.
It owns the merge; running the rounds is the caller's.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

from loadtest.runner.client import RequestRecord
from loadtest.runner.engines import EngineUsage
from loadtest.runner.run import RunResult
from loadtest.runner.summary import summarize


def round_p99(result: RunResult) -> float | None:
    p99: float | None = result.summary["ttft_s"]["p99"]
    return p99


def _usage(rounds: Sequence[RunResult]) -> list[EngineUsage]:
    merged: dict[str, EngineUsage] = {}
    for result in rounds:
        for e in result.engines:
            m = merged.get(e.url)
            if m is None:
                merged[e.url] = dataclasses.replace(e, busy=e.busy / len(rounds))
                continue
            m.queries += e.queries
            m.hits += e.hits
            m.requests = None if m.requests is None or e.requests is None else m.requests + e.requests
            m.busy += e.busy / len(rounds)
    return list(merged.values())


def _ceiling(rounds: Sequence[RunResult]) -> float | None:
    """Each round's ceiling (a hit rate over its prompt tokens), weighted by those tokens."""
    pairs = [(r.summary["ceiling"], r.summary["prompt_tokens"]) for r in rounds]
    if any(c is None for c, _ in pairs):
        return None
    total = sum(t for _, t in pairs)
    return sum(c * t for c, t in pairs) / total if total else None


def merge_rounds(rounds: Sequence[RunResult]) -> RunResult:
    """One arm's rounds (same engines, same arm) as one result; one round is returned as it is."""
    if not rounds:
        raise ValueError("no rounds to merge")
    if len(rounds) == 1:
        return rounds[0]
    records: list[RequestRecord] = []
    offset, offsets = 0.0, []
    for i, result in enumerate(rounds):
        offsets.append(offset)
        for r in result.records:
            records.append(dataclasses.replace(r, index=len(records), round=i, start_s=r.start_s + offset))
        offset += result.summary["wall_s"]
    usage = _usage(rounds)
    first = rounds[0]
    summary = summarize(records, usage, first.engine_urls, offset, _ceiling(rounds))
    p99s = [round_p99(r) for r in rounds]
    known = [p for p in p99s if p is not None]
    extra: dict[str, Any] = {
        "rounds": len(rounds),
        "ttft_p99_rounds": p99s,
        "ttft_p99_median": statistics.median(known) if known else None,
        "seeds": [r.seed for r in rounds],
        # Round i's own clock: start_s - round_offsets_s[i] after t0_monotonic_rounds[i].
        "t0_monotonic_rounds": [r.summary.get("t0_monotonic") for r in rounds],
        "round_offsets_s": offsets,
        "client_cpu_share": statistics.mean(r.summary.get("client_cpu_share", 0.0) for r in rounds),
        "token_count_mismatches": sum(r.summary.get("token_count_mismatches", 0) for r in rounds),
        "ceiling_block_size": first.summary.get("ceiling_block_size"),
    }
    return dataclasses.replace(first, records=records, engines=usage, summary=summary | extra,
                               workload_params=first.workload_params | {"rounds": len(rounds)})
