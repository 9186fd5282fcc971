"""The engines' side of a run: their /metrics read before, during and after, and what they add up to.

Counters (``vllm:prefix_cache_queries_total`` / ``hits_total``, in tokens; and
``vllm:request_success_total`` when the engine has it) are read before and after the run
and differenced, so a warm or shared engine still reports only this run. Gauges
(``num_requests_running`` / ``waiting``) are sampled during the run to measure each
engine's busy share. Parsing is prometheus_client's own text parser.

Engines are given by URL, or discovered from a cache-router's ``/metrics`` (the
``backend`` label of ``cache_router_backend_healthy``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from router.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_SUMMED = {
    "vllm:prefix_cache_queries_total": "queries",
    "vllm:prefix_cache_hits_total": "hits",
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:request_success_total": "requests",
    "vllm:prompt_tokens_total": "prompt_tokens",
}


@dataclass
class EngineSnapshot:
    """One engine's /metrics at one instant, summed over label sets (model, engine index)."""

    queries: float = 0.0
    hits: float = 0.0
    running: float = 0.0
    waiting: float = 0.0
    requests: float | None = None
    prompt_tokens: float | None = None
    kv_usage: float | None = None
    block_size: int | None = None
    num_gpu_blocks: int | None = None


def parse_metrics(text: str) -> EngineSnapshot:
    snap = EngineSnapshot()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            attr = _SUMMED.get(sample.name)
            if attr is not None:
                setattr(snap, attr, (getattr(snap, attr) or 0.0) + sample.value)
            elif sample.name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
                snap.kv_usage = max(snap.kv_usage or 0.0, sample.value)
            elif sample.name == "vllm:cache_config_info":
                with contextlib.suppress(KeyError, ValueError):
                    snap.block_size = int(sample.labels["block_size"])
                    snap.num_gpu_blocks = int(sample.labels["num_gpu_blocks"])
    return snap


def router_backends(text: str) -> list[str]:
    """Replica URLs a cache-router routes to: those its ``cache_router_backend_healthy`` gauge says are up."""
    found: list[str] = []
    for family in text_string_to_metric_families(text):
        if family.name != "cache_router_backend_healthy":
            continue
        for sample in family.samples:
            url = sample.labels.get("backend", "")
            if url.startswith("http") and sample.value == 1 and url not in found:
                found.append(url)
    return found


@dataclass
class EngineUsage:
    """What one engine did during the run."""

    url: str
    queries: float
    hits: float
    requests: float | None
    busy: float           # mean running + waiting requests over the run's samples
    block_size: int | None
    num_gpu_blocks: int | None


@dataclass
class FleetWatch:
    """Reads every engine before and after a run and samples their queues in between."""

    urls: list[str]
    client: httpx.AsyncClient
    interval_s: float = 0.25
    before: dict[str, EngineSnapshot] = field(default_factory=dict)
    after: dict[str, EngineSnapshot] = field(default_factory=dict)
    busy_sum: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    _task: asyncio.Task[None] | None = None
    _warned: set[str] = field(default_factory=set)

    async def scrape(self) -> dict[str, EngineSnapshot]:
        texts = await asyncio.gather(*(self._get(u) for u in self.urls))
        return {u: parse_metrics(t) for u, t in zip(self.urls, texts, strict=True) if t is not None}

    async def _get(self, url: str) -> str | None:
        try:
            resp = await self.client.get(url.rstrip("/") + "/metrics", timeout=5.0)
            resp.raise_for_status()
            return resp.text
        except httpx.HTTPError as exc:
            if url not in self._warned:  # once per engine: the sampler would repeat it every interval
                self._warned.add(url)
                log.warning("engine %s: /metrics unreadable (%s)", url, type(exc).__name__)
            return None

    async def start(self) -> None:
        self.before = await self.scrape()
        self._task = asyncio.create_task(self._sample(), name="loadtest-fleet-sampler")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self.after = await self.scrape()

    async def _sample(self) -> None:
        try:
            while True:
                snaps = await self.scrape()
                for url, snap in snaps.items():
                    self.busy_sum[url] = self.busy_sum.get(url, 0.0) + snap.running + snap.waiting
                self.samples += 1
                await asyncio.sleep(self.interval_s)
        except asyncio.CancelledError:
            log.debug("fleet sampler stopped with the run after %d samples", self.samples)
            raise

    def usage(self) -> list[EngineUsage]:
        out = []
        for url in self.urls:
            b, a = self.before.get(url), self.after.get(url)
            if a is None:
                continue
            b = b or EngineSnapshot()
            requests = None if a.requests is None else a.requests - (b.requests or 0.0)
            out.append(EngineUsage(url, a.queries - b.queries, a.hits - b.hits, requests,
                                   self.busy_sum.get(url, 0.0) / max(1, self.samples),
                                   a.block_size, a.num_gpu_blocks))
        return out


async def discover_engines(client: httpx.AsyncClient, target: str) -> list[str]:
    """The replicas behind a cache-router, from its /metrics; the target itself if it is an engine.

    [] when the target's metrics say neither (another router): pass ``--engines`` then.
    """
    try:
        resp = await client.get(target.rstrip("/") + "/metrics", timeout=5.0)
        resp.raise_for_status()
    except httpx.HTTPError:
        return []
    backends = router_backends(resp.text)
    if not backends and "vllm:prefix_cache_queries" in resp.text:
        return [target.rstrip("/")]
    # A router may still list a replica that just went away: keep the ones that answer.
    alive = await asyncio.gather(*(_answers(client, b) for b in backends))
    return [b for b, ok in zip(backends, alive, strict=True) if ok]


async def _answers(client: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await client.get(url.rstrip("/") + "/health", timeout=2.0)).status_code < 500
    except httpx.HTTPError:
        return False


async def reset_prefix_caches(client: httpx.AsyncClient, urls: list[str]) -> None:
    """POST /reset_prefix_cache to every engine so the next arm starts cold; raises if one refuses."""
    responses = await asyncio.gather(*(client.post(u.rstrip("/") + "/reset_prefix_cache", timeout=10.0)
                                       for u in urls))
    for url, resp in zip(urls, responses, strict=True):
        if resp.status_code >= 400:
            raise RuntimeError(f"engine {url} refused /reset_prefix_cache: HTTP {resp.status_code}")


async def wait_idle(client: httpx.AsyncClient, urls: list[str], timeout_s: float = 30.0) -> None:
    """Wait until no engine runs or queues a request (the previous arm's stragglers)."""
    watch = FleetWatch(urls, client)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        snaps = await watch.scrape()
        if all(s.running + s.waiting == 0 for s in snaps.values()):
            return
        await asyncio.sleep(0.1)
    log.warning("engines still busy after %.0fs; starting anyway", timeout_s)


async def fleet_capacity_tokens(client: httpx.AsyncClient, urls: list[str]) -> int | None:
    """Total prefix-cache size of the fleet in tokens (sum of num_gpu_blocks x block_size), if reported."""
    snaps = await FleetWatch(urls, client).scrape()
    sizes = [s.num_gpu_blocks * s.block_size for s in snaps.values() if s.num_gpu_blocks and s.block_size]
    return sum(sizes) if sizes and len(sizes) == len(urls) else None
