"""ResilientIndex in front of a real Redis sends a replica's key again only when its expiry is
due for a refresh: a shared prefix recorded by every request costs Redis its new keys only.
Confirmations (no TTL) and longer TTLs always go through; remove and clear forget."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from router.index.redis import RedisBlockIndex
from router.index.resilient import ResilientIndex
from router.types import BackendId, BlockKey
from tests.support.servers import RedisServer

A = BackendId("http://a:1")
KEYS = [BlockKey(n * 7919 + 1) for n in range(1, 41)]


class CountingRedisIndex(RedisBlockIndex):
    """The real Redis index, remembering which keys each record call carried."""

    sent: list[list[BlockKey]]

    async def record(self, replica: BackendId, keys: Sequence[BlockKey], *, ttl_s: float | None) -> None:
        self.sent.append(list(keys))
        await super().record(replica, keys, ttl_s=ttl_s)


@pytest.fixture
async def pair(redis_server: RedisServer, namespace: str) -> AsyncIterator[tuple[ResilientIndex, CountingRedisIndex, list[float]]]:
    base = RedisBlockIndex.from_url(redis_server.url, namespace=namespace, deadline_ms=500)
    inner = CountingRedisIndex(base.client, namespace=namespace, deadline_ms=500)
    inner.sent = []
    now = [1000.0]
    index = ResilientIndex(inner, clock=lambda: now[0], refresh_every_s=1.0)
    yield index, inner, now
    await index.close()


async def test_held_keys_are_refreshed_once_per_interval(pair: tuple[ResilientIndex, CountingRedisIndex, list[float]]) -> None:
    index, inner, now = pair
    await index.record(A, KEYS[:30], ttl_s=600)
    await index.record(A, KEYS[:32], ttl_s=600)  # same prefix, two new blocks
    assert inner.sent == [KEYS[:30], KEYS[30:32]]
    await index.record(A, KEYS[:32], ttl_s=600)
    assert len(inner.sent) == 2  # nothing due: no call at all
    now[0] += 1.5
    await index.record(A, KEYS[:32], ttl_s=600)
    assert inner.sent[-1] == KEYS[:32]  # due again: everything refreshed
    assert await index.lookup(KEYS) == {A: 32}


async def test_confirmations_and_longer_ttls_always_go_through(pair: tuple[ResilientIndex, CountingRedisIndex, list[float]]) -> None:
    index, inner, _ = pair
    await index.record(A, KEYS[:10], ttl_s=5)  # speculative (precise mode)
    await index.record(A, KEYS[:10], ttl_s=None)  # the engine's BlockStored confirms
    await index.record(A, KEYS[:10], ttl_s=600)  # skipped: the confirmation outlives any TTL
    assert inner.sent[:2] == [KEYS[:10], KEYS[:10]]
    await index.record(A, KEYS[:10], ttl_s=None)
    assert len(inner.sent) == 2  # a second confirmation within the interval is skipped


async def test_remove_and_clear_forget_what_was_sent(pair: tuple[ResilientIndex, CountingRedisIndex, list[float]]) -> None:
    index, inner, _ = pair
    await index.record(A, KEYS[:20], ttl_s=600)
    await index.remove(A, KEYS[10:20])  # a stale-hit correction
    await index.record(A, KEYS[:20], ttl_s=600)
    assert inner.sent[-1] == KEYS[10:20]  # the removed keys go back at once
    assert await index.lookup(KEYS) == {A: 20}
    await index.clear(A)  # the replica restarted
    await index.record(A, KEYS[:20], ttl_s=600)
    assert inner.sent[-1] == KEYS[:20]
    assert await index.lookup(KEYS) == {A: 20}
