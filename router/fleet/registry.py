"""The fleet: every replica's health, load, models and circuit, kept current, snapshotted per request.

``Fleet`` owns the replica table and three named background tasks, started and stopped
by the app's lifespan with an HTTP client of their own:

- ``fleet-prober``: ``GET /health`` on every replica each ``health.interval_s``;
- ``fleet-scraper``: ``GET /metrics`` on healthy replicas each ``scheduling.metrics_interval_s``
  (engine queue, KV usage, cache geometry, restart detection);
- ``fleet-models``: ``GET /v1/models`` when a replica turns healthy or restarts, and
  every ``MODELS_REFRESH_S`` (replicas whose models are configured are never asked).

Every request goes out concurrently with its own timeout, so one stuck replica delays
nobody. Replicas start unhealthy; ``probe_all()`` runs one round of everything so the
app can be ready before it accepts traffic.

It refuses to own: who the replicas are (``router.fleet.discovery`` calls ``add``/``remove``),
what their caches hold (the index; the fleet only says when a cache emptied, through
``on_restart``), and the in-flight counts of other routers (``router.fleet.shared_load``
writes ``Backend.shared_in_flight``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from router import metrics
from router.config import BackendConfig, RouterConfig
from router.fleet.backend import Backend, EngineLoad
from router.fleet.breaker import CircuitBreaker
from router.fleet.prober import HealthTracker, probe
from router.fleet.scraper import EngineSample, restarted, scrape
from router.fleet.served_models import fetch_models
from router.scheduling.model import Candidate
from router.types import BackendId

log = logging.getLogger(__name__)

MODELS_REFRESH_S = 30.0
"""Adapters are loaded and unloaded at runtime; 30 s bounds how long a new one is unroutable."""
RESTART_DEDUP_S = 10.0
"""The same restart seen by the other path (events vs metrics) within this window is counted once."""

RemovedCallback = Callable[[BackendId], Awaitable[None]]
RestartCallback = Callable[[BackendId], Awaitable[None]]
CapacityCallback = Callable[[BackendId, int], Awaitable[None]]


@dataclass
class _Replica:
    cfg: BackendConfig
    backend: Backend
    breaker: CircuitBreaker
    tracker: HealthTracker
    sample: EngineSample | None = None
    models_at: float = 0.0
    restart_at: float = float("-inf")
    restart_source: str = ""
    probing: bool = False
    scraping: bool = False


class Fleet:
    def __init__(self, config: RouterConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._replicas: dict[BackendId, _Replica] = {}
        self._on_removed: list[RemovedCallback] = []
        self._on_restart: list[RestartCallback] = []
        self._on_capacity: list[CapacityCallback] = []
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._models_wakeup: asyncio.Event | None = None
        for cfg in config.backends:
            self.add(cfg)

    # --- membership ------------------------------------------------------------------------
    def backends(self) -> list[Backend]:
        return [r.backend for r in self._replicas.values()]

    def get(self, backend_id: BackendId) -> Backend | None:
        r = self._replicas.get(backend_id)
        return r.backend if r is not None else None

    def add(self, cfg: BackendConfig) -> Backend:
        """Add a replica (idempotent by URL); it is routable after its first passing probe."""
        bid = BackendId(cfg.url)
        existing = self._replicas.get(bid)
        if existing is not None:
            return existing.backend
        health = self.config.health
        backend = Backend(
            id=bid, url=cfg.url, draining=cfg.draining, block_size=cfg.block_size,
            capacity_blocks=cfg.capacity_blocks or self.config.index.default_capacity_blocks,
        )
        if cfg.models is not None:
            backend.models = frozenset(cfg.models)
            backend.base_model = cfg.models[0] if cfg.models else None
        self._replicas[bid] = _Replica(
            cfg, backend, CircuitBreaker(health.breaker_failures, health.breaker_cooldown_s),
            HealthTracker(health.failure_threshold, health.success_threshold),
        )
        metrics.BACKEND_HEALTHY.labels(bid).set(0)
        metrics.IN_FLIGHT.labels(bid).set(0)
        metrics.CIRCUIT_OPEN.labels(bid).set(0)
        metrics.BACKEND_DRAINING.labels(bid).set(1 if cfg.draining else 0)
        if self._client is not None:  # running: probe it now rather than an interval from now
            self._spawn(self._check_new(bid), f"fleet-probe-new-{bid}")
        return backend

    async def remove(self, backend_id: BackendId) -> None:
        """Forget a replica; ``on_removed`` callbacks clear what others hold about it."""
        if self._replicas.pop(backend_id, None) is None:
            return
        for gauge in (metrics.BACKEND_HEALTHY, metrics.IN_FLIGHT, metrics.CIRCUIT_OPEN,
                      metrics.BACKEND_DRAINING, metrics.ENGINE_WAITING, metrics.ENGINE_KV_USAGE,
                      metrics.BACKEND_RESTARTS):
            with contextlib.suppress(KeyError):
                gauge.remove(backend_id)
        log.info("fleet: removed %s", backend_id)
        await self._fire(self._on_removed, backend_id)

    def set_draining(self, backend_id: BackendId, draining: bool) -> None:
        r = self._replicas.get(backend_id)
        if r is not None:
            r.backend.draining = draining
            metrics.BACKEND_DRAINING.labels(backend_id).set(1 if draining else 0)

    def models(self) -> set[str]:
        """Models and adapters some healthy replica serves."""
        out: set[str] = set()
        for r in self._replicas.values():
            if r.backend.healthy:
                out |= r.backend.models
        return out

    def ready(self) -> bool:
        return any(r.backend.healthy and not r.backend.draining for r in self._replicas.values())

    # --- the per-request snapshot --------------------------------------------------------------
    def candidates(self, model: str, matched: Mapping[BackendId, int]) -> list[Candidate]:
        """A frozen view of every replica serving ``model``, with the index's matched blocks."""
        now = self._clock()
        stale_before = now - self.config.scheduling.metrics_staleness_s
        cap = self.config.admission.max_concurrency_per_backend
        out: list[Candidate] = []
        for r in self._replicas.values():
            b = r.backend
            if model not in b.models:
                continue
            fresh = b.load.scraped_at > 0 and b.load.scraped_at >= stale_before and r.sample is not None
            s = r.sample if fresh else None
            out.append(Candidate(
                id=b.id, matched_blocks=matched.get(b.id, 0), in_flight=b.in_flight + b.shared_in_flight,
                waiting=s.waiting if s else None, running=s.running if s else None,
                kv_usage=s.kv_usage if s else None, healthy=b.healthy,
                circuit_open=not r.breaker.allows(now), draining=b.draining, max_concurrency=cap,
            ))
        return out

    def acquire(self, backend_id: BackendId) -> None:
        """A request was dispatched to the replica (counted until its stream ends)."""
        r = self._replicas.get(backend_id)
        if r is None:
            return
        r.backend.in_flight += 1
        r.breaker.on_dispatch(self._clock())
        metrics.IN_FLIGHT.labels(backend_id).set(r.backend.in_flight)

    def release(self, backend_id: BackendId, ok: bool) -> None:
        """The request ended; ``ok=False`` (connect error, 5xx, broken stream) feeds the breaker."""
        r = self._replicas.get(backend_id)
        if r is None:
            return  # removed meanwhile
        r.backend.in_flight = max(0, r.backend.in_flight - 1)
        now = self._clock()
        was_open = not r.breaker.allows(now)
        r.breaker.record(ok, now)
        is_open = not r.breaker.allows(now)
        metrics.IN_FLIGHT.labels(backend_id).set(r.backend.in_flight)
        metrics.CIRCUIT_OPEN.labels(backend_id).set(1 if is_open else 0)
        if is_open and not was_open:
            log.warning("fleet: circuit opened for %s after failed requests", backend_id)

    # --- callbacks -------------------------------------------------------------------------
    def on_removed(self, cb: RemovedCallback) -> None:
        self._on_removed.append(cb)

    def on_restart(self, cb: RestartCallback) -> None:
        """``cb(backend_id)`` when a replica's cache emptied (restart seen in metrics or events)."""
        self._on_restart.append(cb)

    def on_capacity(self, cb: CapacityCallback) -> None:
        """``cb(backend_id, capacity_blocks)`` when a replica's KV capacity is learned or changes."""
        self._on_capacity.append(cb)

    def mark_restarted(self, backend_id: BackendId, *, source: str = "events") -> asyncio.Future[None] | None:
        """Report a restart (its cache is empty). Callable from sync code; await the result to
        wait for the ``on_restart`` callbacks. A report from the other source within
        ``RESTART_DEDUP_S`` of the last one is the same restart and is ignored."""
        r = self._replicas.get(backend_id)
        if r is None:
            return None
        now = self._clock()
        if r.restart_source and r.restart_source != source and now - r.restart_at < RESTART_DEDUP_S:
            return None
        r.restart_at, r.restart_source = now, source
        r.backend.generation += 1
        r.models_at = 0.0  # re-learn models: the new process may serve other adapters
        metrics.BACKEND_RESTARTS.labels(backend_id).inc()
        log.warning("fleet: %s restarted (seen in %s); its cache is empty", backend_id, source)
        if self._models_wakeup is not None:
            self._models_wakeup.set()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return None
        return self._spawn(self._fire(self._on_restart, backend_id), f"fleet-restart-{backend_id}")

    async def _fire(self, callbacks: list[Callable[..., Awaitable[None]]], *args: Any) -> None:
        for cb in list(callbacks):
            try:
                await cb(*args)
            except Exception:
                log.exception("fleet: callback %r failed for %s", cb, args[0])

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
        return task

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        if self._client is not None:
            return
        # trust_env=False: engines are reached directly; an HTTP(S)_PROXY meant for the
        # internet must not swallow health probes.
        self._client = httpx.AsyncClient(
            trust_env=False, timeout=self.config.health.timeout_s,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )
        self._models_wakeup = asyncio.Event()
        for name, loop in (("fleet-prober", self._prober), ("fleet-scraper", self._scraper),
                           ("fleet-models", self._models_loop)):
            self._tasks.append(asyncio.create_task(self._run(name, loop), name=name))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        tasks.extend(self._side_tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def probe_all(self) -> None:
        """One round of probes, then models and metrics of the healthy: for start-up readiness."""
        own = self._client is None
        if own:
            self._client = httpx.AsyncClient(trust_env=False, timeout=self.config.health.timeout_s)
        try:
            await self._probe_round()
            await asyncio.gather(self._models_round(force=False), self._scrape_round())
        finally:
            if own and self._client is not None:
                await self._client.aclose()
                self._client = None

    async def _run(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        log.info("%s: started", name)
        try:
            await loop()
        except asyncio.CancelledError:
            log.info("%s: stopped (fleet stopping)", name)
            raise
        except Exception:
            log.exception("%s: stopped by an unexpected error", name)

    async def _every(self, interval_s: float, step: Callable[[], Awaitable[None]], what: str) -> None:
        while True:
            try:
                await step()
            except Exception:  # one bad round must not end the task
                log.exception("fleet: %s round failed", what)
            await asyncio.sleep(interval_s)

    # --- health -----------------------------------------------------------------------------
    async def _prober(self) -> None:
        await self._every(self.config.health.interval_s, lambda: self._probe_round(wait=False), "probe")

    async def _probe_round(self, *, wait: bool = True) -> None:
        """Probe every replica not already being probed. The loop does not wait: a replica
        whose /health hangs until the timeout must not slow down everyone else's probes."""
        tasks = [self._spawn(self._probe_one(bid), f"fleet-probe-{bid}")
                 for bid, r in self._replicas.items() if not r.probing]
        if wait:
            await asyncio.gather(*tasks)
        now = self._clock()
        for bid, r in self._replicas.items():  # open -> half-open happens with time alone
            metrics.CIRCUIT_OPEN.labels(bid).set(0 if r.breaker.allows(now) else 1)

    async def _probe_one(self, bid: BackendId) -> None:
        r = self._replicas.get(bid)
        if r is None or r.probing or self._client is None:
            return
        r.probing = True
        try:
            ok = await probe(self._client, r.backend.url, self.config.health.timeout_s)
        finally:
            r.probing = False
        if self._replicas.get(bid) is not r:
            return  # removed (or replaced) while probing
        if r.tracker.observe(ok):
            r.backend.healthy = r.tracker.healthy
            metrics.BACKEND_HEALTHY.labels(bid).set(1 if r.backend.healthy else 0)
            log.info("fleet: %s is now %s", bid, "healthy" if r.backend.healthy else "unhealthy")
            if r.backend.healthy and self._models_wakeup is not None:
                self._models_wakeup.set()

    async def _check_new(self, bid: BackendId) -> None:
        await self._probe_one(bid)
        r = self._replicas.get(bid)
        if r is not None and r.backend.healthy:
            await asyncio.gather(self._models_one(bid), self._scrape_one(bid))

    # --- models -----------------------------------------------------------------------------
    async def _models_loop(self) -> None:
        assert self._models_wakeup is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._models_wakeup.wait(), MODELS_REFRESH_S)
            self._models_wakeup.clear()
            try:
                await self._models_round(force=False)
            except Exception:
                log.exception("fleet: models round failed")

    async def _models_round(self, *, force: bool) -> None:
        now = self._clock()
        due = [bid for bid, r in self._replicas.items()
               if r.cfg.models is None and r.backend.healthy
               and (force or not r.backend.models or now - r.models_at >= MODELS_REFRESH_S)]
        await asyncio.gather(*(self._models_one(bid) for bid in due))

    async def _models_one(self, bid: BackendId) -> None:
        r = self._replicas.get(bid)
        if r is None or r.cfg.models is not None or self._client is None:
            return
        try:
            base, served = await fetch_models(self._client, r.backend.url, self.config.health.timeout_s)
        except (httpx.HTTPError, OSError, ValueError) as exc:
            log.warning("fleet: cannot read /v1/models of %s: %s", bid, exc)
            return
        if served != r.backend.models:
            log.info("fleet: %s serves %s", bid, sorted(served))
        r.backend.models, r.backend.base_model, r.models_at = served, base, self._clock()

    # --- engine metrics ---------------------------------------------------------------------
    async def _scraper(self) -> None:
        await self._every(self.config.scheduling.metrics_interval_s, lambda: self._scrape_round(wait=False),
                          "scrape")

    async def _scrape_round(self, *, wait: bool = True) -> None:
        tasks = [self._spawn(self._scrape_one(bid), f"fleet-scrape-{bid}")
                 for bid, r in self._replicas.items() if r.backend.healthy and not r.scraping]
        if wait:
            await asyncio.gather(*tasks)

    async def _scrape_one(self, bid: BackendId) -> None:
        r = self._replicas.get(bid)
        if r is None or r.scraping or self._client is None:
            return
        r.scraping = True
        try:
            sample = await scrape(self._client, r.backend.url, self.config.health.timeout_s)
        except (httpx.HTTPError, OSError, ValueError) as exc:
            log.debug("fleet: scrape of %s failed: %s", bid, exc)  # staleness bound handles it
            return
        finally:
            r.scraping = False
        if self._replicas.get(bid) is not r:
            return
        prev, r.sample = r.sample, sample
        b = r.backend
        b.load = EngineLoad(running=sample.running or 0.0, waiting=sample.waiting or 0.0,
                            kv_usage=sample.kv_usage or 0.0, scraped_at=self._clock())
        if sample.waiting is not None:
            metrics.ENGINE_WAITING.labels(bid).set(sample.waiting)
        if sample.kv_usage is not None:
            metrics.ENGINE_KV_USAGE.labels(bid).set(sample.kv_usage)
        if r.cfg.block_size is None and sample.block_size is not None:
            b.block_size = sample.block_size
        if restarted(prev, sample):
            fut = self.mark_restarted(bid, source="metrics")
            if fut is not None:
                await fut
        if r.cfg.capacity_blocks is None and sample.num_blocks and sample.num_blocks != b.capacity_blocks:
            b.capacity_blocks = sample.num_blocks
            log.info("fleet: %s holds %d blocks of %s tokens", bid, sample.num_blocks, b.block_size)
            await self._fire(self._on_capacity, bid, sample.num_blocks)
