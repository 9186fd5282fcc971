"""Engine /metrics and /v1/models parsing: vLLM and SGLang names, restart detection."""

from __future__ import annotations

import pytest

from router.fleet.scraper import EngineSample, parse_engine_metrics, restarted
from router.fleet.served_models import parse_models

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="sim-model"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="sim-model"} 7.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="sim-model"} 0.42
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="sim-model"} 12345.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="sim-model"} 2000.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",enable_prefix_caching="True",engine="0",num_gpu_blocks="2048",prefix_caching_hash_algo="sha256"} 1.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="sim-model"} 0.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="sim-model"} 0.0
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1.7646e+09
"""

SGLANG = """\
sglang:num_running_reqs{model_name="m"} 2
sglang:num_queue_reqs{model_name="m"} 5
sglang:token_usage{model_name="m"} 0.25
sglang:cache_config_info{page_size="64",num_pages="512"} 1
"""


def test_vllm_names() -> None:
    s = parse_engine_metrics(VLLM)
    assert s == EngineSample(running=3.0, waiting=7.0, kv_usage=0.42, block_size=32, num_blocks=2048,
                             prefix_queries=12345.0, start_time=1.7646e9)


def test_older_vllm_and_data_parallel_ranks() -> None:
    text = """\
vllm:num_requests_waiting{engine="0"} 1
vllm:num_requests_waiting{engine="1"} 4
vllm:gpu_cache_usage_perc{engine="0"} 0.2
vllm:gpu_cache_usage_perc{engine="1"} 0.6
vllm:cache_config_info{block_size="16",num_gpu_blocks="None"} 1
"""
    s = parse_engine_metrics(text)
    assert s.waiting == 5 and s.kv_usage == pytest.approx(0.4) and s.block_size == 16 and s.num_blocks is None
    assert s.running is None


def test_sglang_names() -> None:
    s = parse_engine_metrics(SGLANG)
    assert (s.running, s.waiting, s.kv_usage, s.block_size, s.num_blocks) == (2, 5, 0.25, 64, 512)


def test_garbage_and_unrelated_series_are_ignored() -> None:
    assert parse_engine_metrics("") == EngineSample()
    assert parse_engine_metrics("foo_bar 1\nvllm:num_requests_waitingX 3\n<html>") == EngineSample()


def test_restart_detection() -> None:
    a = parse_engine_metrics(VLLM)
    assert not restarted(None, a)
    assert not restarted(a, a)
    grown = parse_engine_metrics(VLLM.replace("12345.0", "20000.0"))
    assert not restarted(a, grown)
    assert restarted(grown, parse_engine_metrics(VLLM.replace("12345.0", "16.0")))
    assert restarted(a, parse_engine_metrics(VLLM.replace("1.7646e+09", "1.7647e+09")))


def test_models_base_and_adapters() -> None:
    body = {"object": "list", "data": [
        {"id": "llama", "object": "model", "root": "/models/llama", "parent": None},
        {"id": "sql-lora", "object": "model", "root": "/loras/sql", "parent": "llama"},
    ]}
    assert parse_models(body) == ("llama", frozenset({"llama", "sql-lora"}))
    assert parse_models({"data": [{"id": "x"}]}) == ("x", frozenset({"x"}))  # no parent field at all
    with pytest.raises(ValueError):
        parse_models({"models": []})
    with pytest.raises(ValueError):
        parse_models(["x"])
