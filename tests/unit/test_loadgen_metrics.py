"""Engine /metrics parsing (prometheus_client's parser), deltas, busy share and router discovery."""

from __future__ import annotations

import httpx

from loadtest.runner.engines import EngineSnapshot, FleetWatch, parse_metrics, router_backends
from loadtest.runner.summary import balance

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="sim-model"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="sim-model"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="sim-model"} 0.25
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="sim-model"} 1000.0
vllm:prefix_cache_queries_total{engine="0",model_name="lora-a"} 500.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="sim-model"} 640.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",enable_prefix_caching="True",num_gpu_blocks="2048"} 1.0
"""


def test_parse_vllm_metrics_sums_label_sets_and_reads_cache_config() -> None:
    snap = parse_metrics(VLLM)
    assert snap.queries == 1500.0 and snap.hits == 640.0
    assert snap.running == 3.0 and snap.waiting == 2.0
    assert snap.kv_usage == 0.25
    assert (snap.block_size, snap.num_gpu_blocks) == (16, 2048)
    assert snap.requests is None  # this engine exports no request_success_total


def test_missing_series_leave_defaults() -> None:
    snap = parse_metrics("# TYPE other gauge\nother 1\n")
    assert snap == EngineSnapshot()


def test_usage_is_the_difference_between_after_and_before() -> None:
    watch = FleetWatch(["http://a", "http://b"], httpx.AsyncClient())
    watch.before = {"http://a": EngineSnapshot(queries=100, hits=10), "http://b": EngineSnapshot()}
    watch.after = {"http://a": EngineSnapshot(queries=400, hits=160, block_size=16, num_gpu_blocks=64),
                   "http://b": EngineSnapshot(queries=50, hits=0, requests=4)}
    watch.busy_sum, watch.samples = {"http://a": 6.0, "http://b": 2.0}, 4
    a, b = watch.usage()
    assert (a.queries, a.hits, a.busy, a.block_size) == (300, 150, 1.5, 16)
    assert (b.queries, b.requests, b.busy) == (50, 4, 0.5)


def test_router_backends_are_the_healthy_ones() -> None:
    text = ('# TYPE cache_router_backend_healthy gauge\n'
            'cache_router_backend_healthy{backend="http://127.0.0.1:8001"} 1.0\n'
            'cache_router_backend_healthy{backend="http://127.0.0.1:8002"} 0.0\n'
            '# TYPE cache_router_in_flight gauge\ncache_router_in_flight{backend="http://127.0.0.1:8001"} 2.0\n')
    assert router_backends(text) == ["http://127.0.0.1:8001"]


def test_balance_is_max_over_mean() -> None:
    assert balance([10, 10, 10, 10]) == 1.0
    assert balance([40, 0, 0, 0]) == 4.0
    assert balance([]) is None and balance([0, 0]) is None
