"""A real vLLM's KV events keep the router's index exact (issue 5, precise mode).

The router's own parts, wired as ``create_app`` wires them: a ``Fleet`` probing the
engine, ``EventIngest`` with a bound SUB that the engine's PUB connects to (topic
``kv``) and the engine's replay socket, and the in-process index that only events
write to (nothing is recorded at send time). Request by request, the index's
prediction must equal the engine's ``cached_tokens`` through BlockStored, BlockRemoved
under eviction (64-block cache) and AllBlocksCleared after ``/reset_prefix_cache``. The
engine restart (event sequence back at 0) is in test_vllm_gateway.py, through the whole
router, so the session restarts the engine only once.

Before each prediction the test waits until the router has applied every batch the
engine has published: the engine's replay socket tells the latest sequence number, the
replica's applier tells the next one it expects.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import zmq.asyncio

from router.events.applier import ReplicaApplier
from router.events.ingest import EventIngest
from router.events.subscriber import ReplayClient
from router.fleet.registry import Fleet
from router.hashing.tokenizer import ModelTokenizer
from router.index.memory import MemoryBlockIndex
from router.metrics import REGISTRY
from router.types import BackendId
from tests.support.router import router_config
from tests.vllm.engine import BLOCK_SIZE, SERVED_MODEL, VllmEngine
from tests.vllm.exchange import Exchange
from tests.vllm.prediction import KeyPredictor, Words

pytestmark = pytest.mark.vllm

SETTLE_TIMEOUT_S = 15.0
QUIET_S = 0.1  # the engine publishes a step's events from its own thread, just after answering


class EventSync:
    """Waits until the router's applier has caught up with what the engine published."""

    def __init__(self, ctx: zmq.asyncio.Context, engine: VllmEngine, applier: ReplicaApplier) -> None:
        self.replay = ReplayClient(ctx, engine.replay_endpoint)
        self.applier = applier
        self.next_seq = 0  # the engine's next sequence number, as far as this test knows

    async def engine_next_seq(self) -> int:
        batches = await self.replay.fetch(self.next_seq)
        assert batches is not None, "the engine's replay socket did not answer"
        return max((seq + 1 for seq, _ in batches), default=self.next_seq)

    async def settle(self) -> None:
        """Give the engine's publisher thread a moment, then wait until the applier expects the
        sequence number after the engine's latest batch (re-read each time: it may still grow)."""
        await asyncio.sleep(QUIET_S)
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            self.next_seq = await self.engine_next_seq()
            if self.applier.state.expected == self.next_seq:
                return
            assert time.monotonic() < deadline, (
                f"router expects seq {self.applier.state.expected}, engine published up to {self.next_seq - 1}"
            )
            await asyncio.sleep(0.02)

    def engine_restarted(self) -> None:
        self.next_seq = 0


@dataclass
class Precise:
    exchange: Exchange
    sync: EventSync
    index: MemoryBlockIndex
    fleet: Fleet
    engine: VllmEngine

    async def warm_up(self, words: Words) -> None:
        """Until the engine's PUB has joined the router's SUB (slow joiner), a batch can be lost."""
        for attempt in range(20):
            await self.exchange.client.completions.create(
                model=SERVED_MODEL, prompt=f"warm-up {attempt}" + words.text(40), max_tokens=1
            )
            await self.sync.settle()
            if self.sync.applier.state.expected is not None and self.fleet.get(self.engine.url) is not None:
                return
            await asyncio.sleep(0.2)
        raise AssertionError("no KV event from the engine reached the router")


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def precise(fresh_engine: VllmEngine, tiny_model_dir: Path) -> AsyncIterator[Precise]:
    config = router_config(
        [{"url": fresh_engine.url, "kv_topic": fresh_engine.topic, "kv_replay": fresh_engine.replay_endpoint}],
        tokenizer=str(tiny_model_dir), block_size=BLOCK_SIZE, kv_events_bind=fresh_engine.events_endpoint,
        index={"mode": "precise"},
    )  # fmt: skip
    index = MemoryBlockIndex()
    fleet = Fleet(config)
    fleet.on_restart(lambda backend, *_: index.clear(backend))  # as create_app wires it
    fleet.on_removed(lambda backend, *_: index.clear(backend))
    await fleet.start()
    await fleet.probe_all()
    ingest = EventIngest(config, index, fleet)
    await ingest.start()
    applier = ingest.applier(BackendId(fresh_engine.url))
    assert applier is not None, "EventIngest did not take the engine's events"
    ctx = zmq.asyncio.Context()
    client = openai.AsyncOpenAI(
        base_url=f"{fresh_engine.url}/v1", api_key="unused", max_retries=0, timeout=60.0
    )
    sync = EventSync(ctx, fresh_engine, applier)
    predictor = KeyPredictor(BLOCK_SIZE, SERVED_MODEL, BackendId(fresh_engine.url), index=index)
    tokenizer = ModelTokenizer.from_dir(tiny_model_dir)
    state = Precise(
        Exchange(client, tokenizer, predictor, settle=sync.settle), sync, index, fleet, fresh_engine
    )
    try:
        await state.warm_up(Words(tokenizer, seed=99))
        yield state
    finally:
        await client.close()
        await ingest.stop()
        await fleet.stop()
        ctx.destroy(linger=0)


@pytest.fixture
def words(tiny_model_dir: Path) -> Words:
    return Words(ModelTokenizer.from_dir(tiny_model_dir), seed=21)


async def test_stored_and_removed_under_eviction(precise: Precise, words: Words) -> None:
    url = precise.engine.url
    removed_before = sample("cache_router_kv_events_total", backend=url, type="BlockRemoved")
    ex = precise.exchange
    shared = words.text(70)
    prompts = [shared + words.text(300) for _ in range(8)]  # 11 blocks each, 2 shared: 74 > 64 blocks
    for i, prompt in enumerate(prompts):
        await ex.completion(f"fill {i}", prompt)
    for i in (0, 7, 1, 6, 2):  # the oldest are (partly) evicted, the newest still held
        await ex.completion(f"revisit {i}", prompts[i])
    chat = [
        {"role": "system", "content": "Terse." + words.text(60)},
        {"role": "user", "content": words.text(40)},
    ]
    await ex.chat("chat", chat)
    await ex.chat("chat again", chat)
    ex.assert_all_match()
    removed = sample("cache_router_kv_events_total", backend=url, type="BlockRemoved") - removed_before
    assert removed > 0, "no BlockRemoved reached the router: the cache never evicted\n" + ex.table()
    revisits = [r.cached for r in ex.rows if r.label.startswith("revisit")]
    assert max(revisits) > 0 and min(revisits) < max(revisits), ex.table()


async def test_all_blocks_cleared_after_reset(precise: Precise, words: Words) -> None:
    url = precise.engine.url
    ex = precise.exchange
    prompts = [words.text(100), words.text(150)]
    for i, prompt in enumerate(prompts):
        await ex.completion(f"before reset {i}", prompt)
        await ex.completion(f"before reset {i} again", prompt)
    cleared_before = sample("cache_router_kv_events_total", backend=url, type="AllBlocksCleared")
    precise.engine.reset_prefix_cache()
    # AllBlocksCleared travels with the engine's next step: an unrelated request makes one.
    await ex.completion("unrelated, after reset", words.text(50))
    cleared = sample("cache_router_kv_events_total", backend=url, type="AllBlocksCleared") - cleared_before
    assert cleared >= 1, "AllBlocksCleared did not reach the router"
    for i, prompt in enumerate(prompts):
        await ex.completion(f"after reset {i}", prompt)
        await ex.completion(f"after reset {i} again", prompt)
    ex.assert_all_match()
    assert [r.cached for r in ex.rows[5:]] == [0, 96, 0, 128], ex.table()
