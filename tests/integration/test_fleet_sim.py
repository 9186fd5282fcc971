"""Fleet against the project's simulated vLLM engines (loadtest.engine): the real metric
names, /v1/models with a LoRA adapter, restart and health faults, over real HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from loadtest.engine import SimFleet
from router.config import RouterConfig
from router.fleet.registry import Fleet
from router.types import BackendId


async def until(cond: Callable[[], bool], within: float = 5.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < within, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_fleet_reads_the_simulated_engines() -> None:
    async with SimFleet(2, block_size=16, cache_blocks=256, loras=("sql-lora",)) as sims:
        config = RouterConfig.model_validate({
            "backends": [{"url": u} for u in sims.urls],
            "health": {"interval_s": 0.05, "timeout_s": 0.5, "failure_threshold": 2},
            "scheduling": {"metrics_interval_s": 0.05},
        })
        fleet = Fleet(config)
        restarts: list[str] = []
        capacity: dict[str, int] = {}

        async def on_restart(bid: BackendId) -> None:
            restarts.append(bid)

        async def on_capacity(bid: BackendId, blocks: int) -> None:
            capacity[bid] = blocks

        fleet.on_restart(on_restart)
        fleet.on_capacity(on_capacity)
        await fleet.start()
        try:
            await fleet.probe_all()
            assert fleet.ready()
            assert fleet.models() == {"sim-model", "sql-lora"}
            a = fleet.get(BackendId(sims.urls[0]))
            assert a is not None and a.base_model == "sim-model" and a.block_size == 16
            assert capacity == {u: 256 for u in sims.urls}
            cands = fleet.candidates("sql-lora", {})
            assert len(cands) == 2 and all(c.waiting is not None and c.kv_usage is not None for c in cands)

            async with httpx.AsyncClient(trust_env=False) as client:  # some traffic: counters > 0
                r = await client.post(f"{sims.urls[0]}/v1/completions",
                                      json={"model": "sim-model", "prompt": "hello " * 40, "max_tokens": 2})
                assert r.status_code == 200
            await asyncio.sleep(0.2)  # scraped with the counters up
            assert restarts == []
            await sims.arestart(0)
            await until(lambda: restarts == [sims.urls[0]])
            assert a.generation == 1

            await sims.aset_faults(1, health_fail=True)
            await until(lambda: not fleet.get(BackendId(sims.urls[1])).healthy)  # type: ignore[union-attr]
            await sims.aset_faults(1, health_fail=False)
            await until(lambda: fleet.get(BackendId(sims.urls[1])).healthy)  # type: ignore[union-attr]
        finally:
            await fleet.stop()
