"""Precise mode on the Redis index when Redis stalls: writes lost while it is away are rebuilt
from the engine's replay buffer once it answers, with a bounded number of replays (real
redis-server paused with SIGSTOP, real ZMQ)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import zmq.asyncio

from loadtest.bench_events import SpecPublisher
from router import metrics
from router.config import BackendConfig, RouterConfig
from router.events.ingest import EventIngest
from router.hashing.keys import prompt_keys
from router.index.redis import RedisBlockIndex
from router.types import BackendId
from tests.integration.test_events_zmq import BS, MODEL, URL_A, FleetStandIn, backend, tokens, until
from tests.support.servers import RedisServer, free_port

pytestmark = pytest.mark.timeout(40)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()  # its own: this test pauses it
    yield server
    server.resume()
    server.stop()


def replays() -> float:
    return sum(s.value for m in metrics.KV_REPLAYS.collect() for s in m.samples
               if s.name.endswith("_total") and s.labels.get("backend") == URL_A)


async def test_writes_lost_while_redis_stalls_are_rebuilt_by_replay(own_redis: RedisServer, namespace: str) -> None:
    ctx = zmq.asyncio.Context()
    pub = SpecPublisher(ctx, f"tcp://127.0.0.1:{free_port()}", replay_endpoint=f"tcp://127.0.0.1:{free_port()}")
    config = RouterConfig(index={"namespace": namespace, "selfcheck": False, "events_election": False},
                          backends=[BackendConfig(url=URL_A, kv_events=pub.endpoint, kv_replay=pub.replay_endpoint)])
    fleet = FleetStandIn({URL_A: backend(URL_A)})
    index = RedisBlockIndex.from_url(own_redis.url, namespace=namespace, deadline_ms=100)
    ingest = EventIngest(config, index, fleet)
    await ingest.start()

    async def held(toks: list[int]) -> int:
        return (await index.lookup(prompt_keys(toks, BS, MODEL))).get(BackendId(URL_A), 0)

    chains = [tokens(2, 200 + i) for i in range(4)]

    async def publish(i: int) -> None:
        await pub.publish([pub.stored([pub.block_hash("c", i, j) for j in range(2)], None, chains[i])])

    try:
        await pub.wait_subscribed()
        await publish(0)
        await until(lambda: held(chains[0]))
        before = replays()
        own_redis.pause()
        for i in (1, 2):
            await publish(i)
            await asyncio.sleep(0.3)  # each write waits out its 100 ms deadline
        assert not fleet.items[URL_A].precise  # writes were lost: not exact any more
        own_redis.resume()
        await asyncio.sleep(1.1)  # past the rebuild back-off
        await publish(3)
        for toks in chains:
            await until(lambda t=toks: held(t))  # type: ignore[misc]
        assert fleet.items[URL_A].precise
        assert replays() - before <= 3  # one rebuild per second at most, not one per batch
    finally:
        await ingest.stop()
        await index.close()
        await pub.close()
        ctx.term()
