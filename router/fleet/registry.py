"""The fleet: every replica's health, load, models and circuit, snapshotted per request.

``Fleet`` owns the replica table: membership (``add``/``remove``/``set_draining``, called by
config and ``router.fleet.discovery``), the per-request snapshot (``candidates``), in-flight
counts and the passive circuit breaker (``acquire``/``release``), and the callbacks that
tell other parts a replica left, restarted (cache emptied) or has a known capacity. What
the replicas answer over HTTP is fetched by ``router.fleet.monitor`` (started and stopped
by ``start``/``stop``) and applied here (``apply_*``), so every rule about what a probe or
a scrape means sits in this one module.

Replicas start unhealthy; ``probe_all()`` runs one round of everything so the app can be
ready before it accepts traffic.

It refuses to own: who the replicas are (discovery), what their caches hold (the index;
the fleet only says when a cache emptied, through ``on_restart``), and the in-flight counts
of other routers (``router.fleet.shared_load`` writes ``Backend.shared_in_flight``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from router import metrics
from router.config import BackendConfig, RouterConfig
from router.fleet.backend import Backend, EngineLoad
from router.fleet.breaker import CircuitBreaker
from router.fleet.monitor import Monitor, Replica
from router.fleet.prober import HealthTracker
from router.fleet.scraper import EngineSample, restarted
from router.scheduling.model import Candidate
from router.types import BackendId

log = logging.getLogger(__name__)

RESTART_DEDUP_S = 10.0
"""The same restart seen by the other path (events vs metrics) within this window is counted once."""

RemovedCallback = Callable[[BackendId], Awaitable[None]]
RestartCallback = Callable[[BackendId], Awaitable[None]]
CapacityCallback = Callable[[BackendId, int], Awaitable[None]]


class Fleet:
    def __init__(self, config: RouterConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._replicas: dict[BackendId, Replica] = {}
        self._on_removed: list[RemovedCallback] = []
        self._on_restart: list[RestartCallback] = []
        self._on_capacity: list[CapacityCallback] = []
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._monitor = Monitor(self)
        for cfg in config.backends:
            self.add(cfg)

    def now(self) -> float:
        return self._clock()

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
        self._replicas[bid] = Replica(
            cfg, backend, CircuitBreaker(health.breaker_failures, health.breaker_cooldown_s),
            HealthTracker(health.failure_threshold, health.success_threshold),
        )
        metrics.BACKEND_HEALTHY.labels(bid).set(0)
        metrics.IN_FLIGHT.labels(bid).set(0)
        metrics.CIRCUIT_OPEN.labels(bid).set(0)
        metrics.BACKEND_DRAINING.labels(bid).set(1 if cfg.draining else 0)
        self._monitor.added(bid)  # when running: probed now, not an interval from now
        return backend

    async def remove(self, backend_id: BackendId) -> None:
        """Forget a replica; ``on_removed`` callbacks clear what others hold about it."""
        if self._replicas.pop(backend_id, None) is None:
            return
        _forget_series(backend_id)
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

    def known_models(self) -> set[str]:
        """Models and adapters any replica serves or served, healthy or not: a model in here
        but not in ``models()`` is down (503), not unknown (404)."""
        out: set[str] = set()
        for r in self._replicas.values():
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
        for r in self._replicas.values():  # per request: positional construction, no helpers
            b = r.backend
            if model not in b.models:
                continue
            s = r.sample if b.load.scraped_at >= stale_before and b.load.scraped_at > 0 else None
            out.append(Candidate(
                b.id, matched.get(b.id, 0), b.in_flight + b.shared_in_flight,
                s.waiting if s else None, s.running if s else None, s.kv_usage if s else None,
                b.healthy, not r.breaker.allows(now), b.draining, True, cap,
                b.prefilling, b.prefill_tokens,
                (now - b.prefill_started) * 1000.0 if b.prefilling else 0.0, b.slots,
            ))
        return out

    def acquire(self, backend_id: BackendId, prefill_tokens: int = 0) -> None:
        """A request was dispatched to the replica (counted until its stream ends).

        It also counts as prefilling, with ``prefill_tokens`` predicted uncached prompt
        tokens, until ``first_byte`` says its answer started (the scheduler's time model)."""
        r = self._replicas.get(backend_id)
        if r is None:
            return
        now = self._clock()
        b = r.backend
        b.in_flight += 1
        if not b.prefilling:
            b.prefill_started = now  # an idle compute timeline starts on this one
        b.prefilling += 1
        b.prefill_tokens += max(0, prefill_tokens)
        r.breaker.on_dispatch(now)
        _gauges(backend_id)[0].set(b.in_flight)

    def first_byte(self, backend_id: BackendId, prefill_tokens: int = 0) -> None:
        """The attempt ``acquire`` counted has its first byte (or failed before it): its
        prefill is done. Called once per ``acquire``, with the same ``prefill_tokens``."""
        r = self._replicas.get(backend_id)
        if r is None:
            return
        b = r.backend
        b.prefilling = max(0, b.prefilling - 1)
        b.prefill_tokens = max(0, b.prefill_tokens - max(0, prefill_tokens)) if b.prefilling else 0
        if b.prefilling:
            b.prefill_started = self._clock()  # one prefill done: the next one starts now

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
        in_flight, circuit = _gauges(backend_id)
        in_flight.set(r.backend.in_flight)
        circuit.set(1 if is_open else 0)
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
        self._monitor.wake_models()
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

    # --- lifecycle (the monitor's background tasks) ------------------------------------------
    async def start(self) -> None:
        await self._monitor.start()

    async def stop(self) -> None:
        await self._monitor.stop()
        tasks = list(self._side_tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        for backend_id in self._replicas:  # a stopped fleet vouches for no replica
            _forget_series(backend_id)

    async def probe_all(self) -> None:
        """One round of probes, then models and metrics of the healthy: for start-up readiness."""
        await self._monitor.probe_all()

    # --- what the monitor learned ------------------------------------------------------------
    def replica(self, backend_id: BackendId) -> Replica | None:
        return self._replicas.get(backend_id)

    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    def apply_probe(self, r: Replica, ok: bool) -> bool:
        """Record a probe result; True when the replica just turned healthy."""
        if self._replicas.get(r.backend.id) is not r or not r.tracker.observe(ok):
            return False
        b = r.backend
        b.healthy = r.tracker.healthy
        metrics.BACKEND_HEALTHY.labels(b.id).set(1 if b.healthy else 0)
        log.info("fleet: %s is now %s", b.id, "healthy" if b.healthy else "unhealthy")
        return b.healthy

    def refresh_gauges(self) -> None:
        """Gauges that change with time alone: a circuit turning half-open, a scrape going stale.

        A stale engine gauge is removed rather than left at its last value: a dashboard must
        show "unknown", not a queue length from minutes ago."""
        now = self._clock()
        stale_before = now - self.config.scheduling.metrics_staleness_s
        for bid, r in self._replicas.items():
            metrics.CIRCUIT_OPEN.labels(bid).set(0 if r.breaker.allows(now) else 1)
            if not r.stale_reported and r.sample is not None and r.backend.load.scraped_at < stale_before:
                r.stale_reported = True
                for gauge in (metrics.ENGINE_WAITING, metrics.ENGINE_KV_USAGE):
                    with contextlib.suppress(KeyError):
                        gauge.remove(bid)

    def apply_models(self, r: Replica, base: str | None, served: frozenset[str]) -> None:
        if self._replicas.get(r.backend.id) is not r:
            return
        if served != r.backend.models:
            log.info("fleet: %s serves %s", r.backend.id, sorted(served))
        r.backend.models, r.backend.base_model, r.models_at = served, base, self._clock()

    async def apply_sample(self, r: Replica, sample: EngineSample) -> None:
        """Engine load, cache geometry and restart detection from one /metrics scrape."""
        b = r.backend
        if self._replicas.get(b.id) is not r:
            return
        prev, r.sample = r.sample, sample
        if (sample.waiting and prev is not None and prev.waiting and sample.running
                and sample.running == prev.running):
            # Queueing in two scrapes in a row at the same running count: that count is the
            # engine's limit (one scrape can catch a request that arrived between two steps).
            # Never below what it has run at that limit before.
            b.slots = max(b.slots or 0, int(sample.running))
            metrics.ENGINE_SLOTS.labels(b.id).set(b.slots)
        b.load = EngineLoad(running=sample.running or 0.0, waiting=sample.waiting or 0.0,
                            kv_usage=sample.kv_usage or 0.0, scraped_at=self._clock())
        r.stale_reported = False
        if sample.waiting is not None:
            metrics.ENGINE_WAITING.labels(b.id).set(sample.waiting)
        if sample.kv_usage is not None:
            metrics.ENGINE_KV_USAGE.labels(b.id).set(sample.kv_usage)
        if r.cfg.block_size is None and sample.block_size is not None:
            b.block_size = sample.block_size
        if restarted(prev, sample):
            fut = self.mark_restarted(b.id, source="metrics")
            if fut is not None:
                await fut
        if r.cfg.capacity_blocks is None and sample.num_blocks and sample.num_blocks != b.capacity_blocks:
            b.capacity_blocks = sample.num_blocks
            log.info("fleet: %s holds %d blocks of %s tokens", b.id, sample.num_blocks, b.block_size)
            await self._fire(self._on_capacity, b.id, sample.num_blocks)


_Child = Any  # a prometheus_client Gauge child (the library exports no type for it)
_children: dict[BackendId, tuple[_Child, _Child]] = {}
"""IN_FLIGHT and CIRCUIT_OPEN children per replica, set twice per request: ``labels()`` costs
microseconds each call. Dropped with the series, so a re-added replica gets fresh ones."""


def _gauges(backend_id: BackendId) -> tuple[_Child, _Child]:
    children = _children.get(backend_id)
    if children is None:
        children = _children[backend_id] = (metrics.IN_FLIGHT.labels(backend_id),
                                            metrics.CIRCUIT_OPEN.labels(backend_id))
    return children


def _forget_series(backend_id: BackendId) -> None:
    """Drop a replica's per-replica series: a gone replica must not look alive on a dashboard."""
    _children.pop(backend_id, None)
    for gauge in (metrics.BACKEND_HEALTHY, metrics.IN_FLIGHT, metrics.CIRCUIT_OPEN,
                  metrics.BACKEND_DRAINING, metrics.ENGINE_WAITING, metrics.ENGINE_KV_USAGE, metrics.ENGINE_SLOTS,
                  metrics.BACKEND_RESTARTS):
        with contextlib.suppress(KeyError):
            gauge.remove(backend_id)
