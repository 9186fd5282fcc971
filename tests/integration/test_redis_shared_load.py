"""Shared in-flight counts between router replicas through a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from router.config import RouterConfig
from router.fleet.backend import Backend
from router.fleet.registry import Fleet
from router.fleet.shared_load import SharedLoad
from router.types import BackendId
from tests.support.servers import RedisServer

X, Y = BackendId("http://x:1"), BackendId("http://y:1")


def fleet() -> list[Backend]:
    return [Backend(id=X, url=X), Backend(id=Y, url=Y)]


def router(url: str, ns: str, name: str, backends: list[Backend], ttl_s: float = 0.4) -> SharedLoad:
    client = aioredis.Redis.from_url(url)
    return SharedLoad(
        client, namespace=ns, backends=lambda: backends, router_id=name, ttl_s=ttl_s, deadline_s=0.2
    )


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
async def pair(
    redis_server: RedisServer, namespace: str
) -> AsyncIterator[tuple[list[Backend], list[Backend], SharedLoad, SharedLoad]]:
    fa, fb = fleet(), fleet()
    a, b = router(redis_server.url, namespace, "a", fa), router(redis_server.url, namespace, "b", fb)
    yield fa, fb, a, b
    await a.stop()
    await b.stop()


async def test_each_router_sees_the_others_counts(
    pair: tuple[list[Backend], list[Backend], SharedLoad, SharedLoad],
) -> None:
    fa, fb, a, b = pair
    fa[0].in_flight, fa[1].in_flight = 3, 0
    fb[0].in_flight, fb[1].in_flight = 2, 7
    assert await a.sync_once() and await b.sync_once() and await a.sync_once()
    assert (fa[0].shared_in_flight, fa[1].shared_in_flight) == (2, 7)  # b's, not a's own
    assert (fb[0].shared_in_flight, fb[1].shared_in_flight) == (3, 0)


async def test_a_dead_routers_counts_fade(
    pair: tuple[list[Backend], list[Backend], SharedLoad, SharedLoad],
) -> None:
    fa, fb, a, b = pair
    fb[0].in_flight = 5
    await b.sync_once()  # then b "crashes": it never refreshes nor says goodbye
    await a.sync_once()
    assert fa[0].shared_in_flight == 5
    await asyncio.sleep(0.5)  # past b's ttl of 0.4 s
    await a.sync_once()
    assert fa[0].shared_in_flight == 0


async def test_a_clean_stop_removes_counts_at_once(redis_server: RedisServer, namespace: str) -> None:
    fa, fb = fleet(), fleet()
    a = router(redis_server.url, namespace, "a", fa, ttl_s=30)
    b = router(redis_server.url, namespace, "b", fb, ttl_s=30)
    fb[1].in_flight = 4
    await b.start()  # the background task publishes right away
    for _ in range(50):
        await a.sync_once()
        if fa[1].shared_in_flight == 4:
            break
        await asyncio.sleep(0.02)
    assert fa[1].shared_in_flight == 4
    await b.stop()
    await a.sync_once()
    assert fa[1].shared_in_flight == 0
    await a.stop()


async def test_fail_open_when_redis_dies(own_redis: RedisServer, namespace: str) -> None:
    fa, fb = fleet(), fleet()
    a, b = router(own_redis.url, namespace, "a", fa), router(own_redis.url, namespace, "b", fb)
    try:
        fb[0].in_flight = 6
        await b.sync_once()
        await a.sync_once()
        assert fa[0].shared_in_flight == 6
        own_redis.kill()
        assert not await a.sync_once()
        assert fa[0].shared_in_flight == 6  # kept for a moment: a blip changes nothing
        await asyncio.sleep(0.5)
        assert not await a.sync_once()
        assert fa[0].shared_in_flight == 0  # then this router routes on its own counts
        own_redis.start()
        for _ in range(50):  # reconnects by itself
            if await b.sync_once() and await a.sync_once():
                break
            await asyncio.sleep(0.02)
        assert fa[0].shared_in_flight == 6
    finally:
        await a.stop()
        await b.stop()


async def test_two_fleets_see_each_others_in_flight_in_their_candidates(
    redis_server: RedisServer, namespace: str
) -> None:
    # what the scheduler reads: Fleet.candidates() adds the other routers' counts to its own
    cfg = RouterConfig.model_validate(
        {
            "redis_url": redis_server.url,
            "index": {"namespace": namespace},
            "backends": [{"url": X, "models": ["m"]}, {"url": Y, "models": ["m"]}],
        }
    )
    one, two = Fleet(cfg), Fleet(cfg)
    share_one, share_two = (
        SharedLoad.from_config(cfg, one.backends),
        SharedLoad.from_config(cfg, two.backends),
    )
    assert share_one is not None and share_two is not None
    try:
        one.acquire(X)
        one.acquire(X)
        two.acquire(Y)
        assert await share_one.sync_once() and await share_two.sync_once() and await share_one.sync_once()
        in_flight = {c.id: c.in_flight for c in one.candidates("m", {})}
        assert in_flight == {X: 2, Y: 1}
        in_flight = {c.id: c.in_flight for c in two.candidates("m", {})}
        assert in_flight == {X: 2, Y: 1}
    finally:
        await share_one.stop()
        await share_two.stop()
    assert SharedLoad.from_config(RouterConfig(), one.backends) is None  # no Redis, nothing to share
