"""Summary figures and the report files (JSON, Markdown, PNG) from hand-made records."""

from __future__ import annotations

from pathlib import Path

from loadtest.report import load_results, markdown_table, write_report
from loadtest.runner.client import RequestRecord
from loadtest.runner.engines import EngineUsage
from loadtest.runner.run import RunResult
from loadtest.runner.summary import summarize

E1, E2 = "http://127.0.0.1:9001", "http://127.0.0.1:9002"


def _records() -> list[RequestRecord]:
    out = []
    for i in range(10):
        ok = i != 9
        out.append(RequestRecord(i, i, 0, i * 0.1, "http://router", ok=ok, error=None if ok else "http_503",
                                 ttft_s=0.010 * (i + 1) if ok else None, e2e_s=0.2, itl_s=[0.005, 0.007] if ok else [],
                                 prompt_tokens=100 if ok else None, cached_tokens=50 if ok else None,
                                 completion_tokens=8 if ok else None, backend=E1 if i < 6 else E2,
                                 matched_tokens=48 if ok else None))
    return out


def _result(name: str) -> RunResult:
    records = _records()
    engines = [EngineUsage(E1, 600, 300, None, 3.0, 16, 64), EngineUsage(E2, 300, 150, None, 1.0, 16, 64)]
    summary = summarize(records, engines, [E1, E2], wall_s=2.0, ceiling_rate=0.6)
    return RunResult(name, ["http://router"], "shared_prefix", 1, {"groups": 2}, {
        "api": "completions", "stream": True, "rate": None, "concurrency": 4, "duration_s": None,
        "max_requests": None}, "closed", [E1, E2], 16, "2026-11-29T10:00:00+00:00", records, engines, summary)


def test_summary_figures_follow_from_the_records() -> None:
    s = _result("a").summary
    assert (s["requests"], s["ok"], s["errors"]) == (10, 9, {"http_503": 1})
    assert s["hit_rate_usage"] == 0.5            # 9 x 50 cached / 9 x 100 prompt
    assert s["hit_rate_counters"] == 0.5         # (300 + 150) / (600 + 300)
    assert abs(s["of_ceiling"] - 0.5 / 0.6) < 1e-12
    assert s["engine_requests"] == {E1: 6.0, E2: 4.0} and s["engine_requests_source"] == "router header"
    assert s["load_balance"] == 6 / 5 and s["busy_balance"] == 3 / 2
    assert s["engine_busy_share"] == {E1: 0.75, E2: 0.25}
    assert abs(s["ttft_s"]["p50"] - 0.05) < 1e-9  # ttfts 10..90 ms, median 50 ms
    assert s["throughput_rps"] == 4.5 and s["output_tokens_per_s"] == 36.0
    assert s["predicted_tokens"] == 9 * 48 and s["predicted_requests"] == 9
    assert s["stale_predictions"] == 0  # predicted 48 <= cached 50 on every request


def test_report_files_round_trip(tmp_path: Path) -> None:
    results = [_result("round_robin"), _result("cache_aware")]
    paths = write_report(results, tmp_path / "cmp.json", title="Comparison")
    for key in ("ttft", "engines", "hit_rate"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[key].stat().st_size > 2000
    text = paths["markdown"].read_text()
    assert "| cache_aware | 9/10 | http_503:1 | 50.0% | 50.0% | 60.0% | 83.3% |" in text
    assert "cmp-ttft.png" in text and E2 in text
    assert "| cache_aware | 9 | 432 | 450 | 0 (0.0%) |" in text
    again = load_results(paths["json"])
    assert [r.name for r in again] == ["round_robin", "cache_aware"]
    assert again[1].records[3].ttft_s == results[1].records[3].ttft_s
    assert markdown_table(again) == markdown_table(results)
