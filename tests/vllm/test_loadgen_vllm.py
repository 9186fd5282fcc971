"""The load generator against a real vLLM engine (CPU build, tiny model, block size 32, 64 blocks).

Checks the parts that only a real engine can confirm: its SSE chunks and usage chunk are
read (TTFT, cached tokens), its /metrics are parsed (block size from cache_config_info,
prefix-cache counters that agree with the usage figures), our tokenizer counts the prompt
tokens vLLM counts, and on one engine whose cache holds the working set the hit rate is
the ceiling computed offline, with vLLM's last-token cap.
"""

from __future__ import annotations

import pytest

from loadtest.runner.run import RunOptions, run_workload
from loadtest.workloads import build_workload
from tests.vllm.engine import BLOCK_SIZE, SERVED_MODEL, VllmEngine

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(180)]


@pytest.mark.parametrize("api", ["completions", "chat"])
async def test_one_real_engine_reaches_the_ceiling(fresh_engine: VllmEngine, api: str) -> None:
    # 2 groups x 160-token system prompts, 12 short requests: about 30 of the engine's 64 blocks.
    workload = build_workload(
        "shared_prefix", 3, requests=12, groups=2, system_tokens=160, question_tokens=16, output_tokens=4
    )
    opts = RunOptions(api=api, concurrency=1, progress=False, model=SERVED_MODEL, engines=[fresh_engine.url])
    result = await run_workload(workload, fresh_engine.url, opts)
    s = result.summary
    assert s["ok"] == 12, s["errors"]
    assert result.block_size == BLOCK_SIZE  # read from vllm:cache_config_info
    assert s["token_count_mismatches"] == 0  # our tokenizer counts what vLLM counts
    assert s["usage_coverage"] == 1.0 and s["ttft_s"]["p50"] is not None
    assert s["hit_rate_usage"] == pytest.approx(s["hit_rate_counters"], abs=1e-9)
    assert s["hit_rate_usage"] > 0.3
    assert s["hit_rate_usage"] == pytest.approx(s["ceiling"], abs=1e-9)
