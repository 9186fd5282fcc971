"""Rounds of one arm merged into one result, and the demo's verdict on the median of per-round p99s."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.runner.client import RequestRecord
from loadtest.runner.engines import EngineUsage
from loadtest.runner.rounds import merge_rounds
from loadtest.runner.run import RunResult
from loadtest.runner.summary import summarize
from router.demo import verdicts

E1, E2 = "http://127.0.0.1:9001", "http://127.0.0.1:9002"


def _round(name: str, ttfts_ms: list[float], *, seed: int = 1, prompt: int = 100, cached: int = 50,
           ceiling: float | None = 0.6, wall: float = 2.0) -> RunResult:
    records = [RequestRecord(i, i, 0, i * 0.01, "http://router", ok=True, ttft_s=t / 1000, e2e_s=0.2,
                             itl_s=[0.005], prompt_tokens=prompt, cached_tokens=cached, completion_tokens=4,
                             backend=E1 if i % 2 else E2) for i, t in enumerate(ttfts_ms)]
    engines = [EngineUsage(E1, 600, 300, 5.0, 2.0, 16, 64), EngineUsage(E2, 400, 100, 5.0, 1.0, 16, 64)]
    summary = summarize(records, engines, [E1, E2], wall_s=wall, ceiling_rate=ceiling)
    return RunResult(name, ["http://router"], "shared_prefix", seed, {}, {}, "closed", [E1, E2], 16,
                     "2026-11-29T14:00:00+00:00", records, engines, summary)


def _flat(ms: float, n: int = 100, spike: float | None = None) -> list[float]:
    """n requests at ``ms``; with ``spike``, the slowest 5 at that value (one stall of the machine)."""
    values = [ms] * n
    if spike is not None:
        values[-5:] = [spike] * 5
    return values


def test_merge_keeps_every_request_and_the_per_round_p99s() -> None:
    rounds = [_round("a", _flat(50), seed=1), _round("a", _flat(60, spike=300), seed=2),
              _round("a", _flat(70), seed=3, prompt=300, cached=0, ceiling=0.2, wall=3.0)]
    merged = merge_rounds(rounds)
    s = merged.summary
    assert len(merged.records) == 300 and [r.index for r in merged.records] == list(range(300))
    assert [r.round for r in merged.records[::100]] == [0, 1, 2]
    assert merged.records[100].start_s == pytest.approx(2.0) and merged.records[200].start_s == pytest.approx(4.0)
    assert s["rounds"] == 3 and s["seeds"] == [1, 2, 3] and s["wall_s"] == pytest.approx(7.0)
    assert s["ttft_p99_rounds"] == [r.summary["ttft_s"]["p99"] for r in rounds]
    assert s["ttft_p99_median"] == pytest.approx(0.070)
    assert s["ttft_s"]["p99"] == pytest.approx(0.300)  # pooled: the one stall still sets it
    # counters summed over rounds, the ceiling weighted by each round's prompt tokens
    e1 = next(e for e in merged.engines if e.url == E1)
    assert (e1.queries, e1.hits, e1.requests, e1.busy) == (1800, 900, 15.0, 2.0)
    assert s["hit_rate_counters"] == pytest.approx(1200 / 3000)
    assert s["ceiling"] == pytest.approx((0.6 * 10_000 + 0.6 * 10_000 + 0.2 * 30_000) / 50_000)
    assert s["hit_rate_usage"] == pytest.approx(10_000 / 50_000)


def test_one_round_is_returned_unchanged() -> None:
    one = _round("a", _flat(50))
    assert merge_rounds([one]) is one
    with pytest.raises(ValueError):
        merge_rounds([])


def _by(**arms: list[list[float]]) -> dict[str, list[RunResult]]:
    return {"shared_prefix": [merge_rounds([_round(name, t, seed=i) for i, t in enumerate(rounds)])
                              for name, rounds in arms.items()]}


def _line(by: dict[str, list[RunResult]]) -> str:
    (line,) = verdicts(by)
    return line


def test_one_stalled_round_does_not_decide_the_verdict() -> None:
    by = _by(cache_aware=[_flat(80), _flat(80, spike=400), _flat(80)],
             round_robin=[_flat(100)] * 3, least_load=[_flat(90)] * 3)
    pooled: Any = by["shared_prefix"][0].summary["ttft_s"]["p99"]
    assert pooled > 0.1  # a single-number p99 over all requests would call it worse
    line = _line(by)
    assert ": ok (within 10% of both in 2/3 rounds)" in line and "TTFT p99 (median of 3 rounds) 80 ms" in line
    assert "[80-400 ms]" in line


def test_a_policy_slower_in_most_rounds_is_worse() -> None:
    by = _by(cache_aware=[_flat(120), _flat(130), _flat(80)],
             round_robin=[_flat(100)] * 3, least_load=[_flat(90)] * 3)
    assert ": WORSE (within 10% of both in 1/3 rounds)" in _line(by)


def test_single_round_verdict_is_the_plain_p99() -> None:
    by = {"w": [_round("cache_aware", _flat(105)), _round("round_robin", _flat(100)),
                _round("least_load", _flat(120))]}
    assert "TTFT p99 105 ms vs round_robin 100 ms, least_load 120 ms: ok;" in _line(by)
    by = {"w": [_round("cache_aware", _flat(115)), _round("round_robin", _flat(100))]}
    assert ": WORSE;" in _line(by)
