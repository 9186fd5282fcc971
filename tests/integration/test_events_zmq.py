"""Precise mode over real ZMQ sockets on 127.0.0.1: every invalidation path of issue 5.

A spec-faithful publisher (``loadtest.bench_events.SpecPublisher``, written from the fact
sheet, not from the router's decoder) plays the engine; a real ``EventIngest`` subscribes;
the in-process index is checked through its public ``lookup``. The fleet is a minimal
stand-in with the agreed interface (backends / get / mark_restarted), since only those
three calls are used here.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import zmq
import zmq.asyncio

from loadtest.bench_events import SpecPublisher
from router import metrics
from router.config import BackendConfig, RouterConfig
from router.events.ingest import EventIngest
from router.fleet.backend import Backend
from router.hashing.keys import prompt_keys
from router.index.memory import MemoryBlockIndex
from router.types import BackendId
from tests.support.servers import free_port

BS = 16
MODEL = "sim-model"
URL_A = "http://127.0.0.1:9001"
URL_B = "http://127.0.0.1:9002"

pytestmark = pytest.mark.timeout(30)


@dataclass
class FleetStandIn:
    items: dict[str, Backend]
    restarts: list[str] = field(default_factory=list)

    def backends(self) -> list[Backend]:
        return list(self.items.values())

    def get(self, rid: str) -> Backend | None:
        return self.items.get(rid)

    def mark_restarted(self, rid: str) -> None:
        self.restarts.append(rid)


def backend(url: str, block_size: int = BS) -> Backend:
    return Backend(id=BackendId(url), url=url, models=frozenset({MODEL}), base_model=MODEL,
                   healthy=True, block_size=block_size)


def tokens(n_blocks: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(8192) for _ in range(n_blocks * BS)]


def metric(counter: Any, *labels: str) -> float:
    return float(counter.labels(*labels)._value.get())


async def until(cond: Callable[[], Any], within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        result = cond()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


class Rig:
    """One engine (publisher) and a router's ingest connected to it."""

    def __init__(self, ctx: zmq.asyncio.Context, pub: SpecPublisher, ingest: EventIngest,
                 index: MemoryBlockIndex, fleet: FleetStandIn) -> None:
        self.ctx, self.pub, self.ingest, self.index, self.fleet = ctx, pub, ingest, index, fleet

    async def held(self, toks: list[int], url: str = URL_A, namespace: str = MODEL,
                   salt: str | None = None) -> int:
        found = await self.index.lookup(prompt_keys(toks, BS, namespace, salt))
        return found.get(BackendId(url), 0)

    async def store_chain(self, toks: list[int], parent: Any = None, *, lose: bool = False,
                          **kw: Any) -> list[Any]:
        n = len(toks) // (kw.get("block_size") or self.pub.block_size)
        hashes = [self.pub.block_hash(id(self), tuple(toks[: (i + 1) * BS])) for i in range(n)]
        await self.pub.publish([self.pub.stored(hashes, parent, toks, **kw)], lose=lose)
        return hashes

    async def applied(self, seq: int) -> None:
        applier = self.ingest.applier(BackendId(URL_A))
        assert applier is not None
        await until(lambda: applier.state.expected is not None and applier.state.expected > seq)


@pytest.fixture
async def make_rig() -> AsyncIterator[Callable[..., Any]]:
    ctx = zmq.asyncio.Context()
    made: list[Rig] = []

    async def make(*, replay: bool = True, positional: bool = False, int_hashes: bool = True,
                   block_size: int = BS, config_block_size: int = BS, record_cpu: bool = False,
                   replay_topic_frame: bool = True, events_silence_s: float = 30.0) -> Rig:
        pub = SpecPublisher(ctx, f"tcp://127.0.0.1:{free_port()}", topic="kv",
                            replay_endpoint=f"tcp://127.0.0.1:{free_port()}" if replay else None,
                            positional=positional, int_hashes=int_hashes, block_size=block_size,
                            replay_topic_frame=replay_topic_frame)
        config = RouterConfig(
            block_size=config_block_size,
            backends=[BackendConfig(url=URL_A, kv_events=pub.endpoint, kv_replay=pub.replay_endpoint)],
            index={"record_cpu_blocks": record_cpu, "events_silence_s": events_silence_s},
        )
        fleet = FleetStandIn({URL_A: backend(URL_A, config_block_size)})
        index = MemoryBlockIndex()
        ingest = EventIngest(config, index, fleet)
        await ingest.start()
        await pub.wait_subscribed()
        applier = ingest.applier(BackendId(URL_A))
        assert applier is not None
        if replay:  # the bootstrap replay has run (else it could swallow the gap a test makes)
            await until(lambda: applier.state.expected is not None)
            assert fleet.items[URL_A].precise  # an engine that never published holds nothing: exact
        rig = Rig(ctx, pub, ingest, index, fleet)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        await rig.ingest.stop()
        await rig.pub.close()
    ctx.term()


@pytest.mark.parametrize("positional", [False, True], ids=["map", "positional"])
@pytest.mark.parametrize("int_hashes", [True, False], ids=["int-hash", "bytes-hash"])
async def test_stored_removed_cleared_in_every_encoding(make_rig: Any, positional: bool, int_hashes: bool) -> None:
    rig = await make_rig(positional=positional, int_hashes=int_hashes)
    toks = tokens(4, seed=1)
    hashes = await rig.store_chain(toks[: 2 * BS])
    more = await rig.store_chain(toks[2 * BS :], parent=hashes[-1])  # continues the chain from its parent
    await until(lambda: rig.held(toks))
    assert await rig.held(toks) == 4
    assert rig.fleet.items[URL_A].precise

    await rig.pub.publish([rig.pub.removed([more[-1]]), rig.pub.removed([more[0]])])  # deepest first
    await rig.applied(2)
    assert await rig.held(toks) == 2

    await rig.pub.publish([rig.pub.cleared()])
    await rig.applied(3)
    assert await rig.held(toks) == 0
    assert metric(metrics.KV_EVENTS, URL_A, "AllBlocksCleared") >= 1


async def test_lora_and_salt_namespace_the_keys(make_rig: Any) -> None:
    rig = await make_rig()
    toks = tokens(2, seed=2)
    await rig.store_chain(toks, lora_name="adapter-x", salt="tenant-1")
    await rig.applied(0)
    assert await rig.held(toks, namespace="adapter-x", salt="tenant-1") == 2
    assert await rig.held(toks) == 0  # the base model without salt never matches
    assert await rig.held(toks, namespace="adapter-x") == 0


async def test_adapter_blocks_without_lora_name_are_not_credited_to_the_base_model(make_rig: Any) -> None:
    rig = await make_rig(positional=True)  # the old vLLM that had lora_id but no lora_name
    toks, plain = tokens(2, 3), tokens(1, 4)
    ev = rig.pub.stored([rig.pub.block_hash("lora", 0), rig.pub.block_hash("lora", 1)], None, toks)
    await rig.pub.publish([[*ev[:5], 7, "GPU"]])  # [tag, hashes, parent, tokens, block_size, lora_id=7, medium]
    await rig.store_chain(plain)
    await rig.applied(1)
    assert await rig.held(toks) == 0  # keyed as the base model they would match base-model requests
    assert await rig.held(plain) == 1


async def test_hybrid_model_follows_the_full_attention_group(make_rig: Any) -> None:
    rig = await make_rig()
    toks = tokens(2, 5)
    hashes = [rig.pub.block_hash("h", 0), rig.pub.block_hash("h", 1)]
    full = {**rig.pub.stored(hashes, None, toks), "group_idx": 0, "kv_cache_spec_kind": "full_attention"}
    window = {**rig.pub.stored(hashes, None, toks), "group_idx": 1, "kv_cache_spec_kind": "sliding_window"}
    await rig.pub.publish([full, window])
    # the sliding window lets its early block go; full attention still holds the whole prefix
    await rig.pub.publish([{**rig.pub.removed(hashes[:1]), "group_idx": 1}])
    await rig.applied(1)
    assert await rig.held(toks) == 2
    await rig.pub.publish([{**rig.pub.removed(hashes[1:]), "group_idx": 0}])
    await rig.applied(2)
    assert await rig.held(toks) == 1


async def test_gap_is_filled_by_replay(make_rig: Any) -> None:
    rig = await make_rig()
    a, b, c = tokens(1, 10), tokens(1, 11), tokens(1, 12)
    gaps = metric(metrics.KV_GAPS, URL_A)
    await rig.store_chain(a)
    await rig.store_chain(b, lose=True)  # seq 1 never reaches the router
    await rig.store_chain(c)
    await rig.applied(2)
    assert (await rig.held(a), await rig.held(b), await rig.held(c)) == (1, 1, 1)
    assert metric(metrics.KV_GAPS, URL_A) == gaps + 1
    assert rig.fleet.items[URL_A].precise


async def test_replay_without_topic_frame_older_vllm(make_rig: Any) -> None:
    rig = await make_rig(replay_topic_frame=False)
    a, b = tokens(1, 13), tokens(1, 14)
    await rig.store_chain(a, lose=True)
    await rig.store_chain(b)
    await rig.applied(1)
    assert (await rig.held(a), await rig.held(b)) == (1, 1)


async def test_gap_without_replay_clears_and_goes_cold(make_rig: Any) -> None:
    rig = await make_rig(replay=False)
    a, b, c, d = tokens(1, 20), tokens(1, 21), tokens(1, 22), tokens(1, 23)
    await rig.store_chain(a)
    await rig.applied(0)
    assert await rig.held(a) == 1
    await rig.store_chain(b, lose=True)
    await rig.store_chain(c)
    await rig.applied(2)
    assert await rig.held(a) == 0  # cleared: it may have been evicted in the lost batch
    assert await rig.held(c) == 1  # the batch that revealed the gap is still applied
    assert not rig.fleet.items[URL_A].precise  # cold
    assert metric(metrics.PRECISE_MODE, URL_A) == 0
    await rig.store_chain(d)
    await rig.applied(3)
    assert rig.fleet.items[URL_A].precise  # new events arrived in order


async def test_replay_socket_silent_counts_as_failed(make_rig: Any) -> None:
    rig = await make_rig()
    assert rig.pub._replay_task is not None
    rig.pub._replay_task.cancel()  # the ROUTER socket stays bound but never answers
    a, b, c = tokens(1, 24), tokens(1, 25), tokens(1, 26)
    failed = metric(metrics.KV_REPLAYS, URL_A, "failed")
    await rig.store_chain(a)
    await rig.store_chain(b, lose=True)
    await rig.store_chain(c)
    await rig.applied(2)
    assert metric(metrics.KV_REPLAYS, URL_A, "failed") == failed + 1
    assert await rig.held(a) == 0 and await rig.held(c) == 1


async def test_restart_seq_back_to_zero_clears_and_reports(make_rig: Any) -> None:
    rig = await make_rig()
    old, new = tokens(2, 30), tokens(2, 31)
    for i in range(3):
        await rig.store_chain(tokens(1, 100 + i))
    await rig.store_chain(old)
    await rig.applied(3)
    assert await rig.held(old) == 2
    rig.pub.restart()
    await rig.store_chain(new)
    await until(lambda: rig.fleet.restarts)
    await rig.applied(0)
    assert await rig.held(old) == 0
    assert await rig.held(new) == 2
    assert rig.fleet.restarts == [URL_A]


async def test_restart_unseen_while_disconnected_is_found_by_the_gap_replay(make_rig: Any) -> None:
    rig = await make_rig()
    a, b = tokens(1, 32), tokens(1, 33)
    await rig.store_chain(a)
    await rig.store_chain(b)
    await rig.applied(1)
    rig.pub.restart()  # a new process; its first batches never reach the router, and its seq passes ours
    new = [tokens(1, 34 + i) for i in range(4)]
    for t in new[:3]:
        await rig.store_chain(t, lose=True)
    await rig.store_chain(new[3])
    await until(lambda: rig.fleet.restarts)
    await rig.applied(3)
    assert (await rig.held(a), await rig.held(b)) == (0, 0)  # the old process's blocks are gone
    assert [await rig.held(t) for t in new] == [1, 1, 1, 1]  # the new one's, replayed from seq 0


async def test_malformed_messages_are_counted_and_skipped(make_rig: Any) -> None:
    rig = await make_rig()
    errors = metric(metrics.KV_DECODE_ERRORS, URL_A)
    await rig.pub.send_raw([b"kv", (0).to_bytes(8, "big"), b"\xc1not msgpack"])
    await rig.pub.send_raw([b"kv", b"short", b"\x90"])
    await rig.pub.send_raw([b"kv"])
    rig.pub.seq = 1  # the malformed seq-0 message used that number
    toks = tokens(1, 40)
    await rig.store_chain(toks)
    await until(lambda: rig.held(toks))
    assert metric(metrics.KV_DECODE_ERRORS, URL_A) == errors + 3


async def test_unknown_parent_resyncs_from_replay(make_rig: Any) -> None:
    rig = await make_rig()
    toks = tokens(3, 50)
    hashes = await rig.store_chain(toks[:BS])
    await rig.applied(0)
    applier = rig.ingest.applier(BackendId(URL_A))
    assert applier is not None
    applier._blocks.clear()  # the router lost its map (as after a skipped message)
    await rig.store_chain(toks[BS:], parent=hashes[0])
    await rig.applied(1)
    assert await rig.held(toks) == 3  # rebuilt by replaying from seq 0


async def test_unknown_parent_without_replay_never_credits_wrong_blocks(make_rig: Any) -> None:
    rig = await make_rig(replay=False)
    toks = tokens(3, 51)
    await rig.pub.publish([rig.pub.stored([rig.pub.block_hash("x", 1), rig.pub.block_hash("x", 2)],
                                          rig.pub.block_hash("never-seen"), toks[BS:])])
    await rig.applied(0)
    assert await rig.held(toks) == 0
    assert not rig.fleet.items[URL_A].precise


async def test_router_started_late_catches_up_by_replay(make_rig: Any) -> None:
    ctx = zmq.asyncio.Context()
    pub = SpecPublisher(ctx, f"tcp://127.0.0.1:{free_port()}", replay_endpoint=f"tcp://127.0.0.1:{free_port()}")
    early = tokens(2, 60)
    hashes = [pub.block_hash(0), pub.block_hash(1)]
    await pub.publish([pub.stored(hashes, None, early)])  # nobody listening: dropped, but buffered
    config = RouterConfig(backends=[BackendConfig(url=URL_A, kv_events=pub.endpoint, kv_replay=pub.replay_endpoint)])
    fleet = FleetStandIn({URL_A: backend(URL_A)})
    index = MemoryBlockIndex()
    ingest = EventIngest(config, index, fleet)
    await ingest.start()
    try:
        await pub.wait_subscribed()
        late = tokens(1, 61)
        await pub.publish([pub.stored([pub.block_hash(2)], hashes[-1], late)])
        await until(lambda: index.lookup_now(prompt_keys(early + late, BS, MODEL)).get(BackendId(URL_A)) == 3)
    finally:
        await ingest.stop()
        await pub.close()
        ctx.term()


@pytest.mark.parametrize("record_cpu", [False, True])
async def test_cpu_medium_recorded_or_ignored_by_config(make_rig: Any, record_cpu: bool) -> None:
    rig = await make_rig(record_cpu=record_cpu)
    gpu, cpu = tokens(1, 70), tokens(1, 71)
    await rig.store_chain(gpu)
    cpu_hashes = await rig.store_chain(cpu, medium="CPU")
    await rig.applied(1)
    assert await rig.held(gpu) == 1
    assert await rig.held(cpu) == (1 if record_cpu else 0)
    await rig.pub.publish([rig.pub.removed(cpu_hashes, medium="CPU")])
    await rig.applied(2)
    assert await rig.held(cpu) == 0


async def test_removal_from_cpu_tier_keeps_the_gpu_copy(make_rig: Any) -> None:
    rig = await make_rig(record_cpu=True)
    toks = tokens(1, 72)
    hashes = await rig.store_chain(toks)
    await rig.store_chain(toks, medium="CPU")  # offloaded copy, same engine hash
    await rig.pub.publish([rig.pub.removed(hashes, medium="CPU")])
    await rig.applied(2)
    assert await rig.held(toks) == 1
    await rig.pub.publish([rig.pub.removed(hashes, medium="GPU")])
    await rig.applied(3)
    assert await rig.held(toks) == 0


async def test_block_size_mismatch_is_loud_and_drops_to_approximate(make_rig: Any, caplog: Any) -> None:
    rig = await make_rig(block_size=32, config_block_size=BS)
    before = metric(metrics.BLOCK_SIZE_MISMATCH, URL_A)
    toks = tokens(4, 80)
    await rig.store_chain(toks, block_size=32)
    await rig.store_chain(tokens(2, 81), block_size=32)
    await rig.applied(1)
    assert metric(metrics.BLOCK_SIZE_MISMATCH, URL_A) == before + 2
    assert not rig.fleet.items[URL_A].precise
    assert await rig.held(toks) == 0
    errors = [r for r in caplog.records if "block" in r.getMessage() and r.levelname == "ERROR"]
    assert len(errors) == 1  # logged once, not per event


async def test_silent_engine_while_serving_loses_precise_mode(make_rig: Any) -> None:
    rig = await make_rig(events_silence_s=0.3)
    await rig.store_chain(tokens(1, 90))
    await rig.applied(0)
    b = rig.fleet.items[URL_A]
    assert b.precise
    b.in_flight = 3  # the engine is serving, yet no event comes
    await until(lambda: not b.precise, within_s=4)
    b.in_flight = 0
    await rig.store_chain(tokens(1, 91))
    await until(lambda: b.precise)


async def test_bound_mode_many_engines_one_endpoint_by_topic() -> None:
    ctx = zmq.asyncio.Context()
    bind = f"tcp://127.0.0.1:{free_port()}"
    config = RouterConfig(kv_events_bind=bind, backends=[
        BackendConfig(url=URL_A, kv_topic="engine-a"), BackendConfig(url=URL_B, kv_topic="engine-b")])
    fleet = FleetStandIn({URL_A: backend(URL_A), URL_B: backend(URL_B)})
    index = MemoryBlockIndex()
    ingest = EventIngest(config, index, fleet)
    await ingest.start()
    pubs = [SpecPublisher(ctx, bind, bind=False, topic=t) for t in ("engine-a", "engine-b", "stranger")]
    try:
        for p in pubs:
            await p.wait_subscribed()
        ta, tb = tokens(2, 1), tokens(3, 2)
        await pubs[0].publish([pubs[0].stored([1, 2], None, ta)])
        await pubs[1].publish([pubs[1].stored([1, 2, 3], None, tb)])  # same engine hashes, other engine
        await pubs[2].publish([pubs[2].stored([9], None, tokens(1, 3))])
        await until(lambda: index.lookup_now(prompt_keys(tb, BS, MODEL)))
        await until(lambda: index.lookup_now(prompt_keys(ta, BS, MODEL)))
        assert index.lookup_now(prompt_keys(ta, BS, MODEL)) == {URL_A: 2}
        assert index.lookup_now(prompt_keys(tb, BS, MODEL)) == {URL_B: 3}
        await pubs[1].publish([pubs[1].removed([3])])
        await until(lambda: index.lookup_now(prompt_keys(tb, BS, MODEL)) == {URL_B: 2})
        assert index.lookup_now(prompt_keys(ta, BS, MODEL)) == {URL_A: 2}
        assert metric(metrics.KV_DECODE_ERRORS, "unknown-topic") >= 1
    finally:
        await ingest.stop()
        for p in pubs:
            await p.close()
        ctx.term()


async def test_bootstrap_from_replay_before_any_live_event() -> None:
    ctx = zmq.asyncio.Context()
    idle = SpecPublisher(ctx, f"tcp://127.0.0.1:{free_port()}", replay_endpoint=f"tcp://127.0.0.1:{free_port()}")
    busy = SpecPublisher(ctx, f"tcp://127.0.0.1:{free_port()}", replay_endpoint=f"tcp://127.0.0.1:{free_port()}")
    held = tokens(3, 62)
    await busy.publish([busy.stored([busy.block_hash(0), busy.block_hash(1)], None, held[: 2 * BS])])
    await busy.publish([busy.stored([busy.block_hash(2)], busy.block_hash(1), held[2 * BS :])])
    config = RouterConfig(backends=[
        BackendConfig(url=URL_A, kv_events=idle.endpoint, kv_replay=idle.replay_endpoint),
        BackendConfig(url=URL_B, kv_events=busy.endpoint, kv_replay=busy.replay_endpoint)])
    fleet = FleetStandIn({URL_A: backend(URL_A), URL_B: backend(URL_B)})
    index = MemoryBlockIndex()
    ingest = EventIngest(config, index, fleet)
    await ingest.start()
    try:
        # no live batch at all: the idle engine never published (precise, empty), the busy one is rebuilt
        await until(lambda: fleet.items[URL_A].precise and fleet.items[URL_B].precise)
        assert index.lookup_now(prompt_keys(held, BS, MODEL)) == {URL_B: 3}
        await busy.wait_subscribed()
        await busy.publish([busy.removed([busy.block_hash(2)])])  # live seq 2 continues the replayed 0..1
        await until(lambda: index.lookup_now(prompt_keys(held, BS, MODEL)) == {URL_B: 2})
    finally:
        await ingest.stop()
        await idle.close()
        await busy.close()
        ctx.term()


async def test_replica_added_to_the_fleet_later_is_followed() -> None:
    """Discovery adds replicas (with event endpoints) that the config file never listed."""
    from router.fleet.registry import Fleet

    ctx = zmq.asyncio.Context()
    pub = SpecPublisher(ctx, f"tcp://127.0.0.1:{free_port()}", replay_endpoint=f"tcp://127.0.0.1:{free_port()}")
    config = RouterConfig(index={"selfcheck": False})
    fleet = Fleet(config)
    index = MemoryBlockIndex()
    ingest = EventIngest(config, index, fleet)
    await ingest.start()
    try:
        added = fleet.add(BackendConfig(url=URL_A, kv_events=pub.endpoint, kv_replay=pub.replay_endpoint))
        added.base_model = MODEL  # what the fleet learns from /v1/models; no HTTP server here
        await pub.wait_subscribed()
        toks = tokens(2, 300)
        await pub.publish([pub.stored([pub.block_hash(0), pub.block_hash(1)], None, toks)])
        await until(lambda: index.lookup_now(prompt_keys(toks, BS, MODEL)) == {URL_A: 2})
        await fleet.remove(BackendId(URL_A))
        await until(lambda: ingest.applier(BackendId(URL_A)) is None)  # and stopped when it leaves
    finally:
        await ingest.stop()
        await fleet.stop()
        await pub.close()
        ctx.term()
