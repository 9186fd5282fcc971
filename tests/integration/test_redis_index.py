"""Redis index behaviour beyond the shared contract: namespaces, no keyspace scans, key format, memory bound."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from router.index import keys as K
from router.index.redis import REFRESH_S, RedisBlockIndex
from router.types import BackendId, BlockKey
from tests.support.servers import RedisServer

A, B = BackendId("http://a:1"), BackendId("http://b:1")


def ks(*ns: int) -> list[BlockKey]:
    return [BlockKey((n * 0x9E3779B97F4A7C15) % 2**64) for n in ns]


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def make(redis_server: RedisServer, ns: str, mode: str = "lua") -> RedisBlockIndex:
    return RedisBlockIndex.from_url(redis_server.url, namespace=ns, deadline_ms=500, lookup_mode=mode)  # type: ignore[arg-type]


async def test_namespaces_isolate(redis_server: RedisServer, namespace: str) -> None:
    one, two = make(redis_server, namespace + "a"), make(redis_server, namespace + "b")
    try:
        await one.record(A, ks(1, 2), ttl_s=None)
        await two.record(B, ks(1), ttl_s=None)
        assert await one.lookup(ks(1, 2)) == {A: 2}
        assert await two.lookup(ks(1, 2)) == {B: 1}
        await two.clear_all()
        assert await one.lookup(ks(1, 2)) == {A: 2}
        assert dict(await one.sizes()) == {A: 2}
    finally:
        await one.clear_all()
        await one.close()
        await two.close()


async def test_every_key_is_under_the_namespace_and_holds_no_text(
    redis_server: RedisServer, namespace: str, raw: aioredis.Redis
) -> None:
    index = make(redis_server, namespace)
    try:
        await index.set_capacity(A, 100)
        await index.record(A, ks(1, 2, 3), ttl_s=30)
        found = [k async for k in raw.scan_iter(match="*")]  # the test may scan; the index never does
        mine = sorted(k.decode() for k in found if k.decode().startswith(namespace + ":"))
        assert mine == sorted([K.replicas(namespace), *K.replica_keys(namespace, A)])  # lru, exp, meta, held
        members = await raw.zrange(K.replica_lru(namespace, A), 0, -1)
        assert [K.member_key(m) for m in members if isinstance(m, bytes)] == ks(1, 2, 3)  # exact, oldest first
    finally:
        await index.clear_all()
        await index.close()


async def test_clear_never_scans(redis_server: RedisServer, namespace: str, raw: aioredis.Redis) -> None:
    index = make(redis_server, namespace)
    try:
        for r in range(5):
            await index.record(BackendId(f"http://r{r}:1"), ks(*range(1, 500)), ttl_s=60)
        await raw.config_resetstat()
        assert await index.clear(BackendId("http://r0:1")) == 499
        await index.clear_all()
        await index.purge_expired()
        await index.sizes()
        stats = await raw.info("commandstats")
        used = {name.removeprefix("cmdstat_") for name in stats}
        assert not used & {"scan", "keys"}, used
        assert "evalsha" in used  # the assertion can fail: commandstats does see our calls
        assert dict(await index.sizes()) == {}
    finally:
        await index.close()


async def test_pipeline_variant_agrees_with_lua(redis_server: RedisServer, namespace: str) -> None:
    lua, pipe = make(redis_server, namespace, "lua"), make(redis_server, namespace, "pipeline")
    try:
        await lua.record(A, ks(*range(1, 300)), ttl_s=None)
        await lua.record(B, ks(*range(1, 40)), ttl_s=0.2)
        await lua.remove(A, ks(150))
        for chain in (ks(*range(1, 300)), ks(1), ks(2, 3), []):
            assert await pipe.lookup(chain) == await lua.lookup(chain)
        assert await pipe.lookup(ks(*range(1, 300))) == {A: 149, B: 39}
    finally:
        await lua.clear_all()
        await lua.close()
        await pipe.close()


async def test_second_router_sees_a_replica_it_never_wrote(redis_server: RedisServer, namespace: str) -> None:
    writer, reader = make(redis_server, namespace), make(redis_server, namespace)
    try:
        assert await reader.lookup(ks(1)) == {}  # reader caches an empty replica list
        await writer.record(A, ks(1, 2), ttl_s=None)
        await writer.record(B, ks(1), ttl_s=None)
        # a router started now is warm from its first lookup
        fresh = make(redis_server, namespace)
        assert await fresh.lookup(ks(1, 2)) == {A: 2, B: 1}
        await fresh.close()
        # the older reader re-reads the registry once its copy is stale, and asks again at once
        await asyncio.sleep(REFRESH_S + 0.05)
        assert await reader.lookup(ks(1, 2)) == {A: 2, B: 1}
    finally:
        await writer.clear_all()
        await writer.close()
        await reader.close()


async def test_registry_forgets_cleared_and_expired_replicas(
    redis_server: RedisServer, namespace: str, raw: aioredis.Redis
) -> None:
    # pods come and go with new addresses: the list every lookup walks must not grow forever
    index = make(redis_server, namespace)
    try:
        await index.record(A, ks(1), ttl_s=None)
        await index.record(B, ks(1), ttl_s=0.05)
        gone = BackendId("http://gone:1")
        await index.record(gone, ks(1), ttl_s=None)
        assert await index.clear(gone) == 1
        await asyncio.sleep(0.1)
        assert await index.purge_expired() == 1
        assert {m.decode() for m in await raw.smembers(K.replicas(namespace)) if isinstance(m, bytes)} == {A}
        await index.record(B, ks(2), ttl_s=None)  # back again: registered again
        assert await index.lookup(ks(2)) == {B: 1}
    finally:
        await index.clear_all()
        await index.close()
