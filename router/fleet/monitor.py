"""The fleet's eyes: background probes, scrapes and model discovery over HTTP.

Three named tasks, started and stopped with the fleet, with an HTTP client of their own:

- ``fleet-prober``: ``GET /health`` on every replica each ``health.interval_s``;
- ``fleet-scraper``: ``GET /metrics`` on healthy replicas each ``scheduling.metrics_interval_s``;
- ``fleet-models``: ``GET /v1/models`` when a replica turns healthy or restarts, and every
  ``MODELS_REFRESH_S`` (replicas whose models are configured are never asked).

Each request runs as its own short task with its own timeout and a replica is never asked
twice at once, so a replica that hangs until the timeout delays nobody else's probes. The
monitor only fetches; what the answers mean is applied by ``router.fleet.registry.Fleet``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from router.config import BackendConfig
from router.fleet.backend import Backend
from router.fleet.breaker import CircuitBreaker
from router.fleet.prober import HealthTracker, probe
from router.fleet.scraper import EngineSample, scrape
from router.fleet.served_models import fetch_models
from router.types import BackendId

if TYPE_CHECKING:
    from router.fleet.registry import Fleet

log = logging.getLogger(__name__)

MODELS_REFRESH_S = 30.0
"""Adapters are loaded and unloaded at runtime; 30 s bounds how long a new one is unroutable."""
STOP_TIMEOUT_S = 5.0
"""Every task here stops at its next await once cancelled; 5 s is a bug, not a slow task."""


@dataclass
class Replica:
    """A Backend with the fleet's private bookkeeping about it."""

    cfg: BackendConfig
    backend: Backend
    breaker: CircuitBreaker
    tracker: HealthTracker
    sample: EngineSample | None = None
    models_at: float = 0.0
    restart_at: float = float("-inf")
    restart_source: str = ""
    probe_task: asyncio.Task[None] | None = None
    """The probe in progress, if any: never two at once, and ``probe_all`` waits for it."""
    scrape_task: asyncio.Task[None] | None = None
    stale_reported: bool = False
    """The engine gauges of a stale scrape were removed (until the next good scrape)."""


class Monitor:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.config = fleet.config
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._side: set[asyncio.Task[Any]] = set()
        self._models_wakeup: asyncio.Event | None = None

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    def _new_client(self) -> httpx.AsyncClient:
        # trust_env=False: engines are reached directly; an HTTP(S)_PROXY meant for the
        # internet must not swallow health probes.
        return httpx.AsyncClient(
            trust_env=False, timeout=self.config.health.timeout_s,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        )

    async def start(self) -> None:
        if self.running:
            return
        if self._client is None:
            self._client = self._new_client()
        self._models_wakeup = asyncio.Event()
        loops: tuple[tuple[str, Callable[[], Awaitable[None]]], ...] = (
            ("fleet-prober", self._prober), ("fleet-scraper", self._scraper), ("fleet-models", self._models_loop))
        for name, loop in loops:
            self._tasks.append(asyncio.create_task(self._run(name, loop), name=name))

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._side]
        self._tasks = []
        for t in tasks:
            t.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
            for t in stuck:  # never hang the app's shutdown on one of ours
                log.error("fleet: task %s ignored cancellation; abandoned", t.get_name())
        self._models_wakeup = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def probe_all(self) -> None:
        """Probe everyone, then read models and metrics of the healthy; waits for all of it."""
        own = self._client is None
        if own:
            self._client = self._new_client()
        try:
            await self._probe_round(wait=True)
            await asyncio.gather(self._models_round(), self._scrape_round(wait=True))
        finally:
            if own and self._client is not None:
                await self._client.aclose()
                self._client = None

    def added(self, bid: BackendId) -> None:
        if self.running:
            self._spawn(self._check_new(bid), f"fleet-probe-new-{bid}")

    def wake_models(self) -> None:
        if self._models_wakeup is not None:
            self._models_wakeup.set()

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._side.add(task)
        task.add_done_callback(self._side.discard)
        return task

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

    async def _probe_round(self, *, wait: bool) -> None:
        tasks = [self._probe(r) for r in self.fleet.replicas()]
        if wait:
            await asyncio.gather(*tasks)
        self.fleet.refresh_gauges()

    def _probe(self, r: Replica) -> asyncio.Task[None]:
        """The replica's probe in progress, or a new one (a hanging replica is asked once)."""
        if r.probe_task is None or r.probe_task.done():
            r.probe_task = self._spawn(self._probe_one(r), f"fleet-probe-{r.backend.id}")
        return r.probe_task

    async def _probe_one(self, r: Replica) -> None:
        if self._client is None:
            return
        ok = await probe(self._client, r.backend.url, self.config.health.timeout_s)
        if ok and not r.backend.healthy and r.sample is not None:
            # Coming back from down: read its counters before it is routable again, so a restart
            # (cache emptied) clears its index entries first instead of a scrape interval later.
            await self._scrape(r)
        if self.fleet.apply_probe(r, ok):
            self.wake_models()

    async def _check_new(self, bid: BackendId) -> None:
        r = self.fleet.replica(bid)
        if r is None:
            return
        await self._probe(r)
        if r.backend.healthy:
            await asyncio.gather(self._models_one(r), self._scrape(r))

    # --- models -----------------------------------------------------------------------------
    async def _models_loop(self) -> None:
        wakeup = self._models_wakeup
        assert wakeup is not None
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that arrives as
            # the event is set, and stop() then waited forever for this task.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(MODELS_REFRESH_S):
                    await wakeup.wait()
            wakeup.clear()
            try:
                await self._models_round()
            except Exception:
                log.exception("fleet: models round failed")

    async def _models_round(self) -> None:
        now = self.fleet.now()
        due = [r for r in self.fleet.replicas()
               if r.cfg.models is None and r.backend.healthy
               and (not r.backend.models or now - r.models_at >= MODELS_REFRESH_S)]
        await asyncio.gather(*(self._models_one(r) for r in due))

    async def _models_one(self, r: Replica) -> None:
        if r.cfg.models is not None or self._client is None:
            return
        try:
            base, served = await fetch_models(self._client, r.backend.url, self.config.health.timeout_s)
        except (httpx.HTTPError, OSError, ValueError) as exc:
            log.warning("fleet: cannot read /v1/models of %s: %s", r.backend.id, exc)
            return
        self.fleet.apply_models(r, base, served)

    # --- engine metrics ---------------------------------------------------------------------
    async def _scraper(self) -> None:
        await self._every(self.config.scheduling.metrics_interval_s, lambda: self._scrape_round(wait=False),
                          "scrape")

    async def _scrape_round(self, *, wait: bool) -> None:
        tasks = [self._scrape(r) for r in self.fleet.replicas() if r.backend.healthy]
        if wait:
            await asyncio.gather(*tasks)

    def _scrape(self, r: Replica) -> asyncio.Task[None]:
        if r.scrape_task is None or r.scrape_task.done():
            r.scrape_task = self._spawn(self._scrape_one(r), f"fleet-scrape-{r.backend.id}")
        return r.scrape_task

    async def _scrape_one(self, r: Replica) -> None:
        if self._client is None:
            return
        try:
            sample = await scrape(self._client, r.backend.url, self.config.health.timeout_s)
        except (httpx.HTTPError, OSError, ValueError) as exc:
            log.debug("fleet: scrape of %s failed: %s", r.backend.id, exc)  # the staleness bound handles it
            return
        await self.fleet.apply_sample(r, sample)
