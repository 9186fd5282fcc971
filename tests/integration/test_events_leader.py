"""One elected KV-event ingester per shared Redis, and fail-over when it dies (real redis-server, real ZMQ).

Two routers (each its own EventIngest and Redis index client, one Redis namespace) watch one
engine. Only the lease holder subscribes and writes; the other routes with the index the
holder fills and copies its precise flags. When the holder dies without releasing the lease,
the other takes over once the lease expires and catches up by replay from the engine.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import zmq.asyncio

from loadtest.bench_events import SpecPublisher
from router.config import BackendConfig, RouterConfig
from router.events.ingest import EventIngest
from router.events.leader import IngestLease
from router.fleet.backend import Backend
from router.hashing.keys import prompt_keys
from router.index.connection import connect
from router.index.redis import RedisBlockIndex
from router.types import BackendId
from tests.integration.test_events_zmq import BS, MODEL, URL_A, FleetStandIn, backend, tokens, until
from tests.support.servers import RedisServer, free_port

pytestmark = pytest.mark.timeout(40)
LEASE_S = 2.0  # long enough that a loaded CI machine never misses a renewal (every ttl/3)


class Router:
    def __init__(self, config: RouterConfig, namespace: str, url: str) -> None:
        self.fleet = FleetStandIn({URL_A: backend(URL_A)})
        self.index = RedisBlockIndex.from_url(url, namespace=namespace, deadline_ms=200)
        self.ingest = EventIngest(config, self.index, self.fleet)

    @property
    def backend(self) -> Backend:
        return self.fleet.items[URL_A]

    async def held(self, toks: list[int]) -> int:
        return (await self.index.lookup(prompt_keys(toks, BS, MODEL))).get(BackendId(URL_A), 0)


async def chain(pub: SpecPublisher, toks: list[int], tag: Any) -> None:
    hashes = [pub.block_hash(tag, i) for i in range(len(toks) // BS)]
    await pub.publish([pub.stored(hashes, None, toks)])


async def test_one_ingester_and_fail_over(redis_server: RedisServer, namespace: str) -> None:
    ctx = zmq.asyncio.Context()
    pub = SpecPublisher(ctx, f"tcp://127.0.0.1:{free_port()}", replay_endpoint=f"tcp://127.0.0.1:{free_port()}")
    config = RouterConfig(redis_url=redis_server.url,
                          index={"namespace": namespace, "events_lease_s": LEASE_S, "selfcheck": False},
                          backends=[BackendConfig(url=URL_A, kv_events=pub.endpoint, kv_replay=pub.replay_endpoint)])
    a, b = Router(config, namespace, redis_server.url), Router(config, namespace, redis_server.url)
    await a.ingest.start()
    await b.ingest.start()
    try:
        await until(lambda: a.ingest.ingesting or b.ingest.ingesting)
        await asyncio.sleep(LEASE_S)  # several renew rounds: the other must stay a follower
        assert a.ingest.ingesting != b.ingest.ingesting
        leader, follower = (a, b) if a.ingest.ingesting else (b, a)
        assert follower.ingest.applier(BackendId(URL_A)) is None  # it does not subscribe at all

        await pub.wait_subscribed()
        first = tokens(2, 1)
        await chain(pub, first, "first")
        await until(lambda: follower.held(first))  # written once, by the leader, seen by both
        await until(lambda: follower.backend.precise)  # the leader's verdict, copied

        await leader.ingest.stop(release_lease=False)  # dies: the lease must expire by itself
        lost = tokens(2, 2)
        await chain(pub, lost, "lost")  # nobody subscribed: dropped, but in the replay buffer
        await until(lambda: follower.ingest.ingesting, within_s=LEASE_S * 5)
        await pub.wait_subscribed()
        late = tokens(1, 3)
        await chain(pub, late, "late")
        await until(lambda: follower.held(late))
        assert await follower.held(lost) == 2  # caught up by replay from the engine's buffer
        assert await follower.held(first) == 2
    finally:
        for r in (a, b):
            await r.ingest.stop()
            await r.index.close()
        await pub.close()
        ctx.term()


async def test_clean_stop_hands_over_at_once(redis_server: RedisServer, namespace: str) -> None:
    client, _ = connect(redis_server.url, deadline_ms=500)
    one = IngestLease(client, namespace=namespace, ttl_s=30)
    two = IngestLease(client, namespace=namespace, ttl_s=30)
    try:
        assert await one.acquire_or_renew()
        assert not await two.acquire_or_renew()
        assert await one.acquire_or_renew()  # renewing its own lease
        await one.publish_precise({URL_A: True})
        assert await two.read_precise() == {URL_A: True}
        await two.release()  # not the holder: no effect
        assert await one.holder() == one.token
        await one.release()
        assert await two.acquire_or_renew()  # no wait for the 30 s expiry
    finally:
        await client.aclose()
