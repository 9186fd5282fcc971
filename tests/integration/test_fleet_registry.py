"""Fleet against real uvicorn servers on 127.0.0.1 that speak vLLM's /health, /metrics and /v1/models.

Each engine stand-in is a tiny Starlette app whose answers the test changes while the
fleet's real background tasks probe and scrape it over HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from router import metrics
from router.config import BackendConfig, RouterConfig
from router.fleet.registry import Fleet
from router.fleet.scraper import EngineSample
from router.types import BackendId
from tests.support.servers import UvicornThread, free_port


class Engine:
    """A vLLM-like engine's control surface, changed by the test at will."""

    def __init__(self, models: list[tuple[str, str | None]] | None = None) -> None:
        self.healthy = True
        self.health_delay = 0.0
        self.metrics_ok = True
        self.waiting = 2.0
        self.kv = 0.3
        self.queries = 1000.0
        self.start_time = 1.7646e9
        self.blocks = 4096
        self.models = models or [("sim-model", None)]
        self.hits: Counter[str] = Counter()
        self.app = Starlette(routes=[
            Route("/health", self._health), Route("/metrics", self._metrics), Route("/v1/models", self._models)])

    async def _health(self, request: Request) -> Response:
        self.hits["health"] += 1
        if self.health_delay:
            await asyncio.sleep(self.health_delay)
        return Response(status_code=200 if self.healthy else 503)

    async def _metrics(self, request: Request) -> Response:
        self.hits["metrics"] += 1
        if not self.metrics_ok:
            return PlainTextResponse("boom", status_code=500)
        return PlainTextResponse(
            f'vllm:num_requests_running{{engine="0",model_name="sim-model"}} 1.0\n'
            f'vllm:num_requests_waiting{{engine="0",model_name="sim-model"}} {self.waiting}\n'
            f'vllm:kv_cache_usage_perc{{engine="0",model_name="sim-model"}} {self.kv}\n'
            f'vllm:prefix_cache_queries_total{{engine="0",model_name="sim-model"}} {self.queries}\n'
            f'vllm:cache_config_info{{block_size="16",engine="0",num_gpu_blocks="{self.blocks}"}} 1.0\n'
            f"process_start_time_seconds {self.start_time}\n")

    async def _models(self, request: Request) -> Response:
        self.hits["models"] += 1
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "parent": parent} for name, parent in self.models]})


Engines = list[tuple[Engine, UvicornThread]]


@pytest.fixture
def engines() -> Iterator[Engines]:
    started: Engines = []
    served: list[list[tuple[str, str | None]]] = [[("sim-model", None), ("sql-lora", "sim-model")],
                                                  [("sim-model", None)]]
    for models in served:
        e = Engine(models)
        started.append((e, UvicornThread(e.app).start()))
    yield started
    for _, server in started:
        server.stop()


def fast_config(urls: list[str], **backend: object) -> RouterConfig:
    return RouterConfig.model_validate({
        "backends": [{"url": u, **backend} for u in urls],
        "health": {"interval_s": 0.05, "timeout_s": 0.3, "failure_threshold": 2, "success_threshold": 1,
                   "breaker_failures": 3, "breaker_cooldown_s": 0.3},
        "scheduling": {"metrics_interval_s": 0.05, "metrics_staleness_s": 0.4},
    })


async def until(cond: Callable[[], bool], within: float = 3.0) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > within:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def gauge(metric: object, bid: str) -> float:
    name = metric._name  # type: ignore[attr-defined]
    for sample in (name, f"{name}_total"):
        value = metrics.REGISTRY.get_sample_value(sample, {"backend": bid})
        if value is not None:
            return value
    return -1.0


async def test_probe_all_makes_the_fleet_ready_with_models_load_and_capacity(engines: Engines) -> None:
    urls = [s.url for _, s in engines]
    fleet = Fleet(fast_config(urls))
    learned: list[tuple[str, int]] = []

    async def on_capacity(bid: BackendId, blocks: int) -> None:
        learned.append((bid, blocks))

    fleet.on_capacity(on_capacity)
    assert not fleet.ready() and fleet.models() == set()  # unhealthy until probed
    assert all(c.healthy is False for c in fleet.candidates("sim-model", {})) or fleet.candidates("sim-model", {}) == []
    await fleet.probe_all()
    assert fleet.ready()
    assert fleet.models() == {"sim-model", "sql-lora"}
    a, b = (fleet.get(BackendId(u)) for u in urls)
    assert a is not None and b is not None
    assert a.base_model == "sim-model" and a.models == {"sim-model", "sql-lora"} and b.models == {"sim-model"}
    assert a.block_size == 16 and a.capacity_blocks == 4096
    assert sorted(learned) == sorted((u, 4096) for u in urls)
    cands = fleet.candidates("sql-lora", {BackendId(urls[0]): 5})
    assert [c.id for c in cands] == [urls[0]]
    c = cands[0]
    assert (c.matched_blocks, c.waiting, c.kv_usage, c.running, c.healthy) == (5, 2.0, 0.3, 1.0, True)
    assert gauge(metrics.BACKEND_HEALTHY, urls[0]) == 1.0 and gauge(metrics.ENGINE_WAITING, urls[0]) == 2.0


async def test_probe_all_after_start_waits_for_the_probes_already_running(engines: Engines) -> None:
    # The app's lifespan: start() (the prober fires at once), then probe_all() for readiness.
    (e0, s0), (e1, s1) = engines
    e0.health_delay = e1.health_delay = 0.2  # still answering when probe_all begins
    fleet = Fleet(fast_config([s0.url, s1.url]))
    await fleet.start()
    try:
        await asyncio.sleep(0.05)  # the prober's first probes are now waiting on the engines
        await fleet.probe_all()
        assert fleet.ready() and fleet.models() == {"sim-model", "sql-lora"}
        assert all(c.waiting == 2.0 for c in fleet.candidates("sim-model", {}))
    finally:
        await fleet.stop()


async def test_unhealthy_hanging_and_dead_replicas_leave_and_come_back(engines: Engines) -> None:
    (e0, s0), (e1, s1) = engines
    fleet = Fleet(fast_config([s0.url, s1.url, f"http://127.0.0.1:{free_port()}"]))
    await fleet.start()
    try:
        dead = fleet.backends()[2]
        await until(lambda: all(b.healthy for b in fleet.backends()[:2]))
        assert not dead.healthy  # nothing listens there
        e0.healthy = False
        await until(lambda: not fleet.backends()[0].healthy)
        assert gauge(metrics.BACKEND_HEALTHY, s0.url) == 0.0
        assert [c.healthy for c in fleet.candidates("sim-model", {})] == [False, True]  # dead: models unknown
        assert fleet.ready() and fleet.models() == {"sim-model"}  # the adapter's only replica is down
        assert fleet.known_models() == {"sim-model", "sql-lora"}  # down, not unknown
        e0.healthy = True
        await until(lambda: fleet.backends()[0].healthy)
        # a replica whose /health hangs past the timeout turns unhealthy; the other keeps being probed
        e1.health_delay = 2.0
        before = e0.hits["health"]
        await until(lambda: not fleet.backends()[1].healthy)
        assert e0.hits["health"] - before >= 8  # every 0.05 s, not at the hanging one's pace
        e1.health_delay = 0.0
        await until(lambda: fleet.backends()[1].healthy)
    finally:
        await fleet.stop()
    assert all(t.get_name() not in {"fleet-prober", "fleet-scraper", "fleet-models"} or t.done()
               for t in asyncio.all_tasks())


async def test_engine_restart_seen_when_counters_go_back(engines: Engines) -> None:
    (e0, s0), _ = engines
    fleet = Fleet(fast_config([s0.url]))
    restarts: list[str] = []

    async def on_restart(bid: BackendId) -> None:
        restarts.append(bid)

    fleet.on_restart(on_restart)
    await fleet.start()
    try:
        backend = fleet.backends()[0]
        await until(lambda: backend.load.scraped_at > 0)
        e0.queries += 500  # normal growth is not a restart
        await asyncio.sleep(0.3)
        assert restarts == [] and backend.generation == 0
        base = gauge(metrics.BACKEND_RESTARTS, s0.url)
        e0.queries = 3.0  # the counter went backwards: a new process, an empty cache
        await until(lambda: restarts == [s0.url])
        assert backend.generation == 1 and gauge(metrics.BACKEND_RESTARTS, s0.url) == max(base, 0) + 1
        # the events part reports the same restart a moment later: counted once
        fut = fleet.mark_restarted(BackendId(s0.url))
        assert fut is None and backend.generation == 1
        e0.start_time += 60  # a second restart, seen by the start time this time
        await until(lambda: len(restarts) == 2)
        assert backend.generation == 2
    finally:
        await fleet.stop()


async def test_stale_engine_metrics_are_dropped_from_candidates(engines: Engines) -> None:
    (e0, s0), _ = engines
    fleet = Fleet(fast_config([s0.url]))
    await fleet.start()
    try:
        await until(lambda: [c.waiting for c in fleet.candidates("sim-model", {})] == [2.0])
        e0.waiting = 9.0
        await until(lambda: fleet.candidates("sim-model", {})[0].waiting == 9.0)
        e0.metrics_ok = False
        waited = await until(lambda: fleet.candidates("sim-model", {})[0].waiting is None)
        assert waited < 1.5
        c = fleet.candidates("sim-model", {})[0]
        assert c.kv_usage is None and c.healthy  # stale load is not ill health
        await until(lambda: gauge(metrics.ENGINE_WAITING, s0.url) == -1.0)  # unknown, not 9 forever
        e0.metrics_ok = True
        await until(lambda: gauge(metrics.ENGINE_WAITING, s0.url) == 9.0)
    finally:
        await fleet.stop()


async def test_in_flight_and_circuit_breaker(engines: Engines) -> None:
    (_, s0), (_, s1) = engines
    fleet = Fleet(fast_config([s0.url, s1.url]))
    await fleet.probe_all()
    a = BackendId(s0.url)
    fleet.acquire(a)
    fleet.acquire(a)
    fleet.get(a).shared_in_flight = 5  # type: ignore[union-attr]  # what other routers hold (shared_load)
    assert fleet.candidates("sim-model", {})[0].in_flight == 7
    assert gauge(metrics.IN_FLIGHT, s0.url) == 2
    for _ in range(3):
        fleet.acquire(a)
        fleet.release(a, ok=False)
    assert fleet.candidates("sim-model", {})[0].circuit_open
    assert gauge(metrics.CIRCUIT_OPEN, s0.url) == 1
    await asyncio.sleep(0.35)  # cooldown: half-open lets one trial through
    assert not fleet.candidates("sim-model", {})[0].circuit_open
    fleet.acquire(a)
    assert fleet.candidates("sim-model", {})[0].circuit_open  # the trial is running
    fleet.release(a, ok=True)
    assert not fleet.candidates("sim-model", {})[0].circuit_open
    fleet.release(a, ok=True)
    fleet.release(a, ok=True)
    assert fleet.get(a).in_flight == 0  # type: ignore[union-attr]
    fleet.release(BackendId("http://gone:1"), ok=False)  # unknown replica: ignored


async def test_the_current_prefill_is_timed_from_an_idle_dispatch_and_from_each_first_byte(engines: Engines) -> None:
    """The scheduler's elapsed credit (``Candidate.prefill_elapsed_ms``): prefills take turns, so
    the one under way began at the dispatch that found the replica idle, or at the last first byte."""
    (_, s0), _ = engines
    now = [100.0]
    fleet = Fleet(fast_config([s0.url]), clock=lambda: now[0])
    await fleet.probe_all()
    a = BackendId(s0.url)

    def elapsed() -> float:
        return fleet.candidates("sim-model", {})[0].prefill_elapsed_ms

    assert elapsed() == 0.0
    fleet.acquire(a, prefill_tokens=600)
    now[0] += 0.010
    fleet.acquire(a, prefill_tokens=600)  # queued behind the first: the clock keeps running
    now[0] += 0.005
    assert elapsed() == pytest.approx(15.0)
    fleet.first_byte(a, prefill_tokens=600)  # the first is done, the second starts now
    now[0] += 0.004
    assert elapsed() == pytest.approx(4.0)
    fleet.first_byte(a, prefill_tokens=600)
    assert elapsed() == 0.0  # nothing prefilling: nothing to credit
    now[0] += 1.0
    fleet.acquire(a, prefill_tokens=50)
    assert elapsed() == 0.0  # an idle replica's next prefill starts at its dispatch
    now[0] += 0.002
    assert elapsed() == pytest.approx(2.0)


async def test_an_engines_slot_count_is_learned_from_two_scrapes_in_a_row_that_show_it_queueing(
        engines: Engines) -> None:
    """``Candidate.slots``: what an engine runs while requests wait is what it can run, once a
    second scrape confirms it (one can catch a request that arrived between two engine steps)."""
    (_, s0), _ = engines
    fleet = Fleet(fast_config([s0.url]))
    await fleet.probe_all()
    a = BackendId(s0.url)
    r = fleet.replica(a)
    assert r is not None

    def slots() -> int | None:
        return fleet.candidates("sim-model", {})[0].slots

    fleet.get(a).slots = None  # type: ignore[union-attr]  # forget what the fixture's scrapes taught
    await fleet.apply_sample(r, EngineSample(running=5, waiting=0))
    await fleet.apply_sample(r, EngineSample(running=6, waiting=1))  # one scrape: maybe transient
    assert slots() is None
    await fleet.apply_sample(r, EngineSample(running=8, waiting=2))  # running moved: not a limit yet
    assert slots() is None
    await fleet.apply_sample(r, EngineSample(running=8, waiting=3))
    assert slots() == 8 and gauge(metrics.ENGINE_SLOTS, s0.url) == 8
    await fleet.apply_sample(r, EngineSample(running=4, waiting=1))
    await fleet.apply_sample(r, EngineSample(running=4, waiting=1))  # KV-bound for a while
    assert slots() == 8  # never below the limit it has run at
    await fleet.remove(a)
    assert gauge(metrics.ENGINE_SLOTS, s0.url) == -1.0  # a removed replica's series goes with it


async def test_add_remove_and_configured_models(engines: Engines) -> None:
    (e0, s0), (e1, s1) = engines
    fleet = Fleet(fast_config([s0.url], models=["sim-model"]))
    removed: list[str] = []

    async def on_removed(bid: BackendId) -> None:
        removed.append(bid)

    fleet.on_removed(on_removed)
    await fleet.start()
    try:
        await until(fleet.ready)
        assert fleet.models() == {"sim-model"}  # configured: the adapter stays unknown
        fleet.add(BackendConfig(url=s1.url))
        waited = await until(lambda: "sim-model" in fleet.get(BackendId(s1.url)).models)  # type: ignore[union-attr]
        assert waited < 1.0
        await fleet.remove(BackendId(s1.url))
        assert removed == [s1.url] and fleet.get(BackendId(s1.url)) is None
        assert gauge(metrics.BACKEND_HEALTHY, s1.url) == -1.0  # label gone
        fleet.set_draining(BackendId(s0.url), True)
        assert not fleet.ready() and fleet.candidates("sim-model", {})[0].draining
    finally:
        await fleet.stop()
    assert e0.hits["models"] == 0 and e1.hits["models"] >= 1



async def test_stop_is_prompt_right_after_a_models_wakeup(engines: Engines) -> None:
    # Regression: asyncio.wait_for swallowed the cancel when the wake-up event was set at
    # the same moment, and stop() waited forever for the models task.
    (_, s0), _ = engines
    fleet = Fleet(fast_config([s0.url]))
    await fleet.start()
    await asyncio.sleep(0.1)
    fleet.mark_restarted(BackendId(s0.url))  # wakes the models task
    t0 = time.monotonic()
    await fleet.stop()
    assert time.monotonic() - t0 < 1.0
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("fleet-") and not t.done()]
