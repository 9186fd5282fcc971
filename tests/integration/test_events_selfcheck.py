"""The start-up self-check against simulated engines (real HTTP and ZMQ on loopback).

A router whose keys equal the engine's keeps precise mode; a wrong block size or a wrong
chat template is refused with an error naming the cause, and the replica stays routable
in approximate mode.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from loadtest.engine import SimFleet
from router.config import RouterConfig
from router.events.ingest import EventIngest
from router.fleet.registry import Fleet
from router.index.memory import MemoryBlockIndex
from router.types import BackendId

pytestmark = pytest.mark.timeout(60)


async def run_check(tokenizer_dir: Path, *, router_block_size: int = 16, engine_block_size: int = 16) -> Any:
    async with SimFleet(1, block_size=engine_block_size, kv_events="bind") as sims:
        spec = sims[0]
        config = RouterConfig.model_validate({
            "tokenizer": str(tokenizer_dir), "block_size": router_block_size,
            "backends": [{"url": spec.url, "kv_events": spec.kv_events, "kv_replay": spec.kv_replay}],
            "health": {"interval_s": 0.2, "timeout_s": 0.5, "failure_threshold": 1},
        })
        fleet = Fleet(config)
        await fleet.start()
        await fleet.probe_all()
        ingest = EventIngest(config, MemoryBlockIndex(), fleet)
        await ingest.start()
        rid = BackendId(spec.url)
        try:
            for _ in range(300):
                if rid in ingest.selfchecks:
                    break
                await asyncio.sleep(0.05)
            backend = fleet.get(rid)
            assert backend is not None
            return ingest.selfchecks.get(rid), backend.precise
        finally:
            await ingest.stop()
            await fleet.stop()


async def test_matching_router_keeps_precise_mode(sim_model_dir: Path) -> None:
    result, precise = await run_check(sim_model_dir)
    assert result is not None and result.ok, result
    assert precise


async def test_block_size_mismatch_is_refused_with_its_cause(sim_model_dir: Path) -> None:
    result, precise = await run_check(sim_model_dir, router_block_size=32, engine_block_size=16)
    assert result is not None and not result.ok
    assert result.cause == "block_size"
    assert not precise


async def test_other_chat_template_is_refused_with_its_cause(sim_model_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "model"
    shutil.copytree(sim_model_dir, other)
    cfg_path = other / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = cfg["chat_template"].replace("{{ bos_token }}", "")  # the router forgets the BOS
    cfg_path.write_text(json.dumps(cfg))
    result, precise = await run_check(other)
    assert result is not None and not result.ok
    assert result.cause == "template", result
    assert not precise
