"""``GET /metrics`` of a simulated engine, with vLLM's series names and labels.

Values are read from the engine at scrape time (a custom collector), so there is no
second copy of the state to keep in step. Labels ``engine`` ("0", as one vLLM process
reports) and ``model_name``. Counters restart at 0 and ``process_start_time_seconds``
moves when the engine restarts, which is how a scraper can tell.

It owns names and exposition; the numbers belong to ``engine.Engine``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from loadtest.engine.engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LABELS = ["engine", "model_name"]


class EngineCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        e = self.engine
        labels = ["0", e.model]
        stats = e.stats
        for name, doc, value in (
            (
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
                e.scheduler.num_running,
            ),
            (
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
                e.scheduler.num_waiting,
            ),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", e.cache.usage),
            ("vllm:engine_sleep_state", "Engine sleep state.", 0),
        ):
            g = GaugeMetricFamily(name, doc, labels=LABELS)
            g.add_metric(labels, float(value))
            yield g
        for name, doc, value in (
            (
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                stats.prompt_tokens,
            ),
            (
                "vllm:prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
                stats.cached_tokens,
            ),
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.", stats.generation_tokens),
            ("vllm:num_preemptions", "Cumulative number of preemptions from the engine.", 0),
        ):
            c = CounterMetricFamily(name, doc, labels=LABELS)
            c.add_metric(labels, float(value))
            yield c
        done = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*LABELS, "finished_reason"],
        )
        done.add_metric([*labels, "length"], float(stats.requests_ok))
        yield done
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=["block_size", "enable_prefix_caching", "num_gpu_blocks", "prefix_caching_hash_algo"],
        )
        info.add_metric([str(e.cache.block_size), "True", str(e.cache.num_blocks), e.hash_algo], 1.0)
        yield info
        start = GaugeMetricFamily(
            "process_start_time_seconds", "Start time of the process since unix epoch in seconds."
        )
        start.add_metric([], e.start_time)
        yield start


def make_registry(engine: Engine) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
