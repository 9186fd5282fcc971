"""Every Prometheus metric the router exports, in one place, with bounded labels.

Label values: ``backend`` is a replica id (bounded by the fleet), ``model`` a served
model or adapter name (bounded by the fleet's /v1/models), ``arm`` is ``main`` or
``baseline`` (the built-in experiment), ``outcome``/``reason``/``cause``/``stage``/``type``
come from the fixed sets named in each help text. Never a prompt, a tenant key or a URL path.

The dashboards and alert rules in ``deploy/`` query these names; a test checks that every
expression there returns data, so renaming one here without updating them fails CI.
"""

from __future__ import annotations

from bisect import bisect_left

import prometheus_client
import prometheus_client.values
from prometheus_client import CollectorRegistry, Counter, Gauge


class LoopValue:
    """A metric's value without prometheus_client's per-value mutex.

    Every metric here is written by the event loop's thread only (work done in a worker
    thread is timed and counted by the coroutine that awaited it, back on the loop), and
    reading a float is atomic under the GIL, so the lock bought nothing but its cost: a
    request updates ~35 values (a histogram observation is two), and without the lock a
    2k-token completion runs 3.6% fewer instructions (callgrind, 1.348M -> 1.299M per
    request; docs/overhead.md). Same interface as ``prometheus_client.values.MutexValue``.
    """

    _multiprocess = False
    __slots__ = ("_exemplar", "_value")

    def __init__(self, typ: str, metric_name: str, name: str, labelnames: object, labelvalues: object,
                 help_text: str, **kwargs: object) -> None:
        self._value = 0.0
        self._exemplar: object = None

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def set_exemplar(self, exemplar: object) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> object:
        return self._exemplar


# prometheus_client picks the value class of every metric child when it is created; the
# router process exports only these metrics, and multi-process mode (its other value class)
# is not used: each worker serves its own /metrics.
prometheus_client.values.ValueClass = LoopValue  # type: ignore[misc,assignment]



class Histogram(prometheus_client.Histogram):
    """prometheus_client's Histogram, finding an observation's bucket by bisection.

    The library walks the bucket bounds in a Python loop and checks observability on every
    call; a request makes eight observations, most in the upper half of 15 buckets. Same
    buckets, sums and exposition (``tests/unit/test_metrics_histogram.py`` compares the two);
    exemplars and the labelled parent's error still go through the library's own code.
    """

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        buckets = getattr(self, "_buckets", None)  # absent on a labelled parent
        if buckets is None or exemplar:
            super().observe(amount, exemplar)
            return
        self._sum.inc(amount)
        buckets[bisect_left(self._upper_bounds, amount)].inc(1)


REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_FAST = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25)

# --- requests -----------------------------------------------------------------------------
REQUESTS = Counter(
    "cache_router_requests", "Requests by replica, model, arm and outcome "
    "(ok, client_error, upstream_error, timeout, cancelled, rejected, no_backend)",
    ["backend", "model", "arm", "outcome"], registry=REGISTRY)
REQUEST_SECONDS = Histogram(
    "cache_router_request_duration_seconds", "End-to-end latency seen by the client",
    ["model", "arm"], buckets=_LATENCY, registry=REGISTRY)
TTFT_SECONDS = Histogram(
    "cache_router_ttft_seconds", "Time to first byte of the upstream answer (first token when streaming)",
    ["model", "arm"], buckets=_LATENCY, registry=REGISTRY)
RETRIES = Counter(
    "cache_router_retries", "Retries to another replica before the first byte (reason: connect, status, timeout)",
    ["reason"], registry=REGISTRY)
STREAM_ERRORS = Counter(
    "cache_router_stream_errors", "Streams broken after the first byte (ended with an SSE error event)",
    ["backend"], registry=REGISTRY)

# --- tokens and savings -------------------------------------------------------------------
PROMPT_TOKENS = Counter(
    "cache_router_prompt_tokens", "Prompt tokens routed", ["model", "arm"], registry=REGISTRY)
PREDICTED_TOKENS = Counter(
    "cache_router_predicted_matched_tokens", "Tokens the index predicted the chosen replica holds",
    ["model", "arm"], registry=REGISTRY)
CACHED_TOKENS = Counter(
    "cache_router_engine_cached_tokens", "Tokens the engine reported cached (usage.prompt_tokens_details)",
    ["model", "arm"], registry=REGISTRY)
LOST_SAVINGS = Counter(
    "cache_router_lost_savings_tokens", "Cacheable prompt tokens that were prefilled anyway, by cause: "
    "workload (no replica held them), routing (another replica held more than the chosen one), "
    "index (promised by the index, not held by the engine)",
    ["model", "arm", "cause"], registry=REGISTRY)
STALE_HITS = Counter(
    "cache_router_stale_hits", "Requests where the engine cached fewer tokens than the index predicted",
    ["backend"], registry=REGISTRY)
DECISIONS = Counter(
    "cache_router_decisions", "Routing decisions by reason (affinity, load, fallback, session, "
    "round_robin, least_load, prefix_hash, random)", ["reason", "arm"], registry=REGISTRY)

# --- fleet ----------------------------------------------------------------------------------
IN_FLIGHT = Gauge(
    "cache_router_in_flight", "Requests dispatched by this router and not finished", ["backend"], registry=REGISTRY)
BACKEND_HEALTHY = Gauge(
    "cache_router_backend_healthy", "1 if the replica passes its active health probe", ["backend"], registry=REGISTRY)
CIRCUIT_OPEN = Gauge(
    "cache_router_circuit_open", "1 while the replica's circuit breaker is open", ["backend"], registry=REGISTRY)
BACKEND_DRAINING = Gauge(
    "cache_router_backend_draining", "1 while the replica is draining", ["backend"], registry=REGISTRY)
ENGINE_WAITING = Gauge(
    "cache_router_engine_waiting", "Engine queue length as last scraped", ["backend"], registry=REGISTRY)
ENGINE_KV_USAGE = Gauge(
    "cache_router_engine_kv_usage", "Engine KV-cache usage 0..1 as last scraped", ["backend"], registry=REGISTRY)
ENGINE_SLOTS = Gauge(
    "cache_router_engine_slots", "Requests the engine runs at once, learned from its /metrics when it queued "
    "(absent until learned); cache_aware keeps affinity off a replica with that many in flight while another "
    "has fewer", ["backend"], registry=REGISTRY)
BACKEND_RESTARTS = Counter(
    "cache_router_engine_restarts", "Engine restarts detected (metrics counters or event sequence reset)",
    ["backend"], registry=REGISTRY)

# --- index ----------------------------------------------------------------------------------
INDEX_BLOCKS = Gauge(
    "cache_router_index_blocks", "Blocks the index credits to each replica", ["backend"], registry=REGISTRY)
INDEX_LOOKUP_SECONDS = Histogram(
    "cache_router_index_lookup_seconds", "Index lookup latency", ["backend_kind"], buckets=_FAST, registry=REGISTRY)
INDEX_ERRORS = Counter(
    "cache_router_index_errors", "Index calls that failed or missed their deadline (op: lookup, record, remove, clear)",
    ["op"], registry=REGISTRY)
INDEX_DEGRADED = Gauge(
    "cache_router_index_degraded", "1 while the index is unreachable and routing fails open", registry=REGISTRY)

# --- hot path stages ------------------------------------------------------------------------
TOKENIZER_APPROXIMATE = Gauge(
    "cache_router_tokenizer_approximate", "1 while a model is keyed in approximate character mode "
    "(no tokenizer configured: token counts are estimates)", ["model"], registry=REGISTRY)
STAGE_SECONDS = Histogram(
    "cache_router_stage_seconds", "Router time per stage (parse, render, tokenize, hash, lookup, score, proxy_connect); "
    "tokenize includes hashing where both run in one pass (text prompts with the chain memo)",
    ["stage"], buckets=_FAST, registry=REGISTRY)

# --- KV events (precise mode) ---------------------------------------------------------------
KV_EVENTS = Counter(
    "cache_router_kv_events", "KV events applied (type: BlockStored, BlockRemoved, AllBlocksCleared)",
    ["backend", "type"], registry=REGISTRY)
KV_DECODE_ERRORS = Counter(
    "cache_router_kv_event_decode_errors", "KV-event messages that could not be decoded and were skipped",
    ["backend"], registry=REGISTRY)
KV_GAPS = Counter(
    "cache_router_kv_event_gaps", "Sequence gaps detected in a replica's KV events", ["backend"], registry=REGISTRY)
KV_REPLAYS = Counter(
    "cache_router_kv_replays", "Replays requested after a gap (outcome: ok, failed, unavailable)",
    ["backend", "outcome"], registry=REGISTRY)
KV_EVENT_LAG = Histogram(
    "cache_router_kv_event_lag_seconds", "Engine timestamp to index applied", buckets=_LATENCY[:10],
    registry=REGISTRY)
BLOCK_RETENTION = Histogram(
    "cache_router_block_retention_seconds", "How long a block stayed in the index before it was removed",
    buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600), registry=REGISTRY)
PRECISE_MODE = Gauge(
    "cache_router_precise_mode", "1 while KV events keep this replica's entries exact", ["backend"], registry=REGISTRY)
BLOCK_SIZE_MISMATCH = Counter(
    "cache_router_block_size_mismatch", "BlockStored events whose block size differs from the configured one",
    ["backend"], registry=REGISTRY)

# --- admission --------------------------------------------------------------------------------
QUEUE_DEPTH = Gauge(
    "cache_router_admission_queue_depth", "Requests waiting for a replica slot", registry=REGISTRY)
REJECTED = Counter(
    "cache_router_rejected", "Requests rejected by admission control (reason: queue_full, deadline, draining)",
    ["reason"], registry=REGISTRY)
