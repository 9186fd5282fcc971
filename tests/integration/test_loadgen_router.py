"""The load generator through a real cache-router in front of simulated engines.

What is checked is the load generator's side: engines discovered from the router's
/metrics, requests per engine taken from ``x-cache-router-backend``, the router's
predictions (``x-cache-router-matched-tokens``) set against the engines' cached tokens,
and a comparison with the built-in direct round robin written as one report.
"""

from __future__ import annotations

from pathlib import Path

from loadtest.compare import DIRECT, compare
from loadtest.engine import SimFleet
from loadtest.runner.run import RunOptions, run_workload
from loadtest.workloads import build_workload
from tests.conftest import SIM_MODEL
from tests.support.router import running_router


async def test_through_the_router_with_discovery_headers_and_a_comparison(tmp_path: Path) -> None:
    with SimFleet(3, block_size=16, cache_blocks=512) as fleet, running_router(
            backends=list(fleet.urls), tokenizer=str(SIM_MODEL), block_size=16, policy="cache_aware") as router:
        workload = build_workload("shared_prefix", 4, requests=30, groups=3, system_tokens=128, question_tokens=16,
                                  output_tokens=4)
        result = await run_workload(workload, router.url, RunOptions(api="chat", concurrency=1, progress=False))
        s = result.summary
        assert sorted(result.engine_urls) == sorted(u.rstrip("/") for u in fleet.urls)  # discovered
        assert s["ok"] == 30 and s["engine_requests_source"] == "router header"
        assert sum(s["engine_requests"].values()) == 30
        assert s["predicted_requests"] == 30 and s["token_count_mismatches"] == 0
        assert s["hit_rate_usage"] == s["hit_rate_counters"] and 0 < s["hit_rate_usage"] <= s["ceiling"]

        results = await compare(workload, {"cache_aware": router.url}, list(fleet.urls),
                                RunOptions(concurrency=2, progress=False), direct_round_robin=True, out_dir=tmp_path)
        assert [r.name for r in results] == [DIRECT, "cache_aware"]
        assert all(r.summary["ok"] == 30 for r in results)
        text = (tmp_path / "compare.md").read_text()
        assert "## Router predictions" in text and "| cache_aware | 30 |" in text
