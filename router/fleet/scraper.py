"""Engine load from ``/metrics``: vLLM and SGLang names, and engine restart detection.

Parsing is pure (``parse_engine_metrics``); only the series the router uses are kept,
by a line filter before ``prometheus_client``'s parser, because a vLLM page is tens of
kilobytes of histograms and the parser is pure Python: parsing it all for every replica
every second would steal the event loop from requests.

A restart (the engine's cache emptied) shows as a counter going backwards
(``vllm:prefix_cache_queries_total``) or a new ``process_start_time_seconds``.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
CACHE_INFO = ("vllm:cache_config_info", "sglang:cache_config_info")
QUERIES = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries")
START_TIME = ("process_start_time_seconds",)
_WANTED = RUNNING + WAITING + KV_USAGE + CACHE_INFO + QUERIES + START_TIME
_PREFIXES = tuple(sorted({n + c for n in _WANTED for c in ("{", " ")}))

# A start time that moves by less than this is float noise in the exposition, not a restart.
_START_TIME_EPSILON_S = 1.0


@dataclass(frozen=True, slots=True)
class EngineSample:
    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None
    """0..1 (mean over the engine's data-parallel ranks)."""
    block_size: int | None = None
    num_blocks: int | None = None
    prefix_queries: float | None = None
    start_time: float | None = None


def _int_label(labels: dict[str, str], *names: str) -> int | None:
    for name in names:
        value = labels.get(name)
        if value is not None:
            try:
                return int(float(value))
            except ValueError:
                continue
    return None


def parse_engine_metrics(text: str) -> EngineSample:
    """The load and cache facts in a Prometheus text page (missing series stay None)."""
    kept = "\n".join(line for line in text.splitlines() if line.startswith(_PREFIXES))
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    block_size = num_blocks = None
    for family in text_string_to_metric_families(kept + "\n"):
        for s in family.samples:
            if s.name in CACHE_INFO:
                block_size = block_size or _int_label(s.labels, "block_size", "page_size")
                num_blocks = num_blocks or _int_label(s.labels, "num_gpu_blocks", "num_pages")
                continue
            sums[s.name] = sums.get(s.name, 0.0) + s.value
            counts[s.name] = counts.get(s.name, 0) + 1

    def total(names: tuple[str, ...]) -> float | None:
        return next((sums[n] for n in names if n in sums), None)

    def mean(names: tuple[str, ...]) -> float | None:
        return next((sums[n] / counts[n] for n in names if n in sums), None)

    return EngineSample(
        running=total(RUNNING),
        waiting=total(WAITING),
        kv_usage=mean(KV_USAGE),
        block_size=block_size,
        num_blocks=num_blocks,
        prefix_queries=total(QUERIES),
        start_time=total(START_TIME),
    )


def restarted(prev: EngineSample | None, cur: EngineSample) -> bool:
    """Did the engine restart between two scrapes? (its cache is then empty)"""
    if prev is None:
        return False
    if (
        prev.start_time is not None
        and cur.start_time is not None
        and abs(cur.start_time - prev.start_time) > _START_TIME_EPSILON_S
    ):
        return True
    return (
        prev.prefix_queries is not None
        and cur.prefix_queries is not None
        and cur.prefix_queries < prev.prefix_queries
    )


async def scrape(client: httpx.AsyncClient, base_url: str, timeout_s: float) -> EngineSample:
    """One scrape; raises httpx.HTTPError (or ValueError on an unparsable page)."""
    response = await client.get(f"{base_url}/metrics", timeout=timeout_s)
    response.raise_for_status()
    return parse_engine_metrics(response.text)
