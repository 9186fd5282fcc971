"""``loadtest.runner.ahead``: what a demo's slowest requests waited behind on their engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.runner.ahead import ahead_of, main, report


def rec(start: float, ttft: float, backend: str, cached: int = 0, round_: int = 0) -> dict[str, object]:
    return {"start_s": start, "ttft_s": ttft, "backend": backend, "cached_tokens": cached,
            "prompt_tokens": 580, "round": round_, "ok": True}


def test_only_unanswered_requests_sent_earlier_to_the_same_engine_are_ahead() -> None:
    slow = rec(1.000, 0.050, "a")
    before_done = rec(0.900, 0.050, "a")  # first byte at 0.950: done before ``slow`` was sent
    still_prefilling = rec(0.990, 0.030, "a", cached=64)
    other_engine = rec(0.995, 0.040, "b")
    later = rec(1.010, 0.030, "a")
    recs = [slow, before_done, still_prefilling, other_engine, later]
    assert ahead_of(slow, recs) == [still_prefilling]


def test_report_names_the_queue_of_each_rounds_slowest_requests(tmp_path: Path) -> None:
    arm = {"name": "cache_aware", "records": [
        rec(0.0, 0.024, "a"), rec(0.005, 0.030, "a", cached=512),  # a hit behind a miss
        rec(0.0, 0.010, "b", cached=512, round_=1), rec(0.5, 0.040, "b", round_=1),  # a miss alone
    ]}
    (tmp_path / "shared_prefix").mkdir()
    (tmp_path / "shared_prefix" / "compare.json").write_text(json.dumps({"arms": [arm, {"name": "direct", "records": []}]}))
    lines = report(tmp_path, shown=1)
    assert lines[:2] == ["== shared_prefix", "  cache_aware"]
    assert lines[2] == "    round 0:   30 ms hit  580 tokens; ahead on its engine: miss sent 5 ms before"
    assert lines[3] == "    round 1:   40 ms miss 580 tokens; ahead on its engine: nothing"
    assert lines[4] == "  direct: no engine recorded per request"
    with pytest.raises(SystemExit) as exc:
        main([])  # no directory: argparse's usage error
    assert exc.value.code == 2
    assert main([str(tmp_path), "--shown", "1"]) == 0
