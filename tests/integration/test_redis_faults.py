"""Fail-open with a real redis-server that is killed, paused (SIGSTOP) and restarted empty.

Every call must raise only IndexUnavailable, within the deadline (plus scheduling slack),
and the index must come back by itself: no reconnect call, no new object.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

import pytest

from router.index import IndexUnavailable
from router.index.redis import RedisBlockIndex
from router.index.resilient import ResilientIndex
from router.metrics import INDEX_DEGRADED
from router.types import BackendId, BlockKey
from tests.support.servers import RedisServer

T = TypeVar("T")
A, B = BackendId("http://a:1"), BackendId("http://b:1")
KEYS = [BlockKey((n * 0x9E3779B97F4A7C15) % 2**64) for n in range(1, 65)]
DEADLINE_MS = 5.0
SLACK_S = 0.1  # a 2-core CI box may not schedule us for a while; the point is "not seconds"


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A private server: these tests kill it."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
async def index(own_redis: RedisServer, namespace: str) -> AsyncIterator[RedisBlockIndex]:
    idx = RedisBlockIndex.from_url(own_redis.url, namespace=namespace, deadline_ms=DEADLINE_MS)
    yield idx
    await idx.close()


async def until_ok(call: Callable[[], Awaitable[T]], within_s: float = 3.0) -> tuple[T, float]:
    """Retry a call until it answers; returns the answer and how long recovery took."""
    t0 = time.monotonic()
    while True:
        try:
            return await call(), time.monotonic() - t0
        except IndexUnavailable:
            if time.monotonic() - t0 > within_s:
                raise
            await asyncio.sleep(0.02)


async def assert_unavailable_fast(call: Callable[[], Awaitable[object]]) -> None:
    t0 = time.monotonic()
    with pytest.raises(IndexUnavailable):
        await call()
    assert time.monotonic() - t0 < DEADLINE_MS / 1000 + SLACK_S


async def warm(index: RedisBlockIndex) -> None:
    # the first call may pay the TCP connect; retry past it on a slow box
    await until_ok(lambda: index.record(A, KEYS, ttl_s=None))


async def test_killed_then_started_again(index: RedisBlockIndex, own_redis: RedisServer) -> None:
    await warm(index)
    own_redis.kill()
    for _ in range(5):
        await assert_unavailable_fast(lambda: index.lookup(KEYS))
        await assert_unavailable_fast(lambda: index.record(A, KEYS, ttl_s=None))
    own_redis.start()
    found, took = await until_ok(lambda: index.lookup(KEYS))
    assert found == {}  # came back empty: nothing credited that the server does not hold
    assert took < 2.0


async def test_paused_two_seconds(index: RedisBlockIndex, own_redis: RedisServer) -> None:
    await warm(index)
    own_redis.pause()
    try:
        t_end = time.monotonic() + 2.0
        calls = 0
        while time.monotonic() < t_end:
            await assert_unavailable_fast(lambda: index.lookup(KEYS))
            calls += 1
            await asyncio.sleep(0.05)
        assert calls >= 10
    finally:
        own_redis.resume()
    found, took = await until_ok(lambda: index.lookup(KEYS))
    assert found == {A: len(KEYS)}  # a pause loses nothing
    assert took < 1.0


async def test_restarted_empty_refills_and_keeps_capacity(
    index: RedisBlockIndex, own_redis: RedisServer
) -> None:
    await until_ok(lambda: index.set_capacity(A, 10))
    await warm(index)
    # (healthy calls retry: a 5 ms deadline can pass on a loaded CI box without any fault)
    assert (await until_ok(lambda: index.lookup(KEYS)))[0] == {}  # capacity 10 kept the chain's tail only
    assert dict((await until_ok(index.sizes))[0]) == {A: 10}
    own_redis.restart()
    await until_ok(lambda: index.record(A, KEYS[:4], ttl_s=None))  # traffic refills it
    assert (await until_ok(lambda: index.lookup(KEYS)))[0] == {A: 4}
    await until_ok(lambda: index.record(A, KEYS, ttl_s=None))
    # the capacity set before the restart still holds (re-applied when the scripts were reloaded)
    assert dict((await until_ok(index.sizes))[0]) == {A: 10}


async def test_degraded_logged_once_and_gauge_follows(
    own_redis: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    inner = RedisBlockIndex.from_url(own_redis.url, namespace=namespace, deadline_ms=DEADLINE_MS)
    await until_ok(lambda: inner.record(A, KEYS, ttl_s=None))  # warm first: a slow connect is an outage too
    index = ResilientIndex(inner, retry_after_s=0.05, fail_fast_after=1)
    try:
        caplog.set_level(logging.INFO, logger="cache_router.index")
        own_redis.kill()
        for _ in range(50):
            with pytest.raises(IndexUnavailable):
                await index.lookup(KEYS)
            await asyncio.sleep(0.005)
        assert index.degraded and INDEX_DEGRADED._value.get() == 1
        own_redis.start()
        await until_ok(lambda: index.record(B, KEYS[:2], ttl_s=None))
        assert not index.degraded and INDEX_DEGRADED._value.get() == 0
        assert (await until_ok(lambda: index.lookup(KEYS)))[0] == {B: 2}
        msgs = [r.getMessage() for r in caplog.records if r.name == "cache_router.index"]
        assert sum("unavailable" in m for m in msgs) == 1, msgs
        assert sum("recovered" in m for m in msgs) == 1, msgs
    finally:
        await index.close()


async def test_fail_fast_while_degraded(own_redis: RedisServer, namespace: str) -> None:
    inner = RedisBlockIndex.from_url(own_redis.url, namespace=namespace, deadline_ms=DEADLINE_MS)
    index = ResilientIndex(inner, retry_after_s=1.0, fail_fast_after=1)
    try:
        await until_ok(lambda: index.record(A, KEYS, ttl_s=None))
        own_redis.pause()
        with pytest.raises(IndexUnavailable):
            await index.lookup(KEYS)  # pays the deadline once
        t0 = time.monotonic()
        for _ in range(100):
            with pytest.raises(IndexUnavailable):
                await index.lookup(KEYS)
        assert time.monotonic() - t0 < 0.05  # then fails fast, not 100 deadlines
    finally:
        own_redis.resume()
        await index.close()


async def test_capacity_set_while_down_applies_with_the_next_write(
    index: RedisBlockIndex, own_redis: RedisServer
) -> None:
    await warm(index)
    own_redis.kill()
    with pytest.raises(IndexUnavailable):
        await index.set_capacity(A, 5)  # the fleet learned it while Redis was away
    own_redis.start()
    await until_ok(lambda: index.record(A, KEYS, ttl_s=None))
    assert dict((await until_ok(index.sizes))[0]) == {A: 5}


async def test_a_flapping_index_is_reported_once(
    own_redis: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    inner = RedisBlockIndex.from_url(own_redis.url, namespace=namespace, deadline_ms=DEADLINE_MS)
    await until_ok(lambda: inner.record(A, KEYS, ttl_s=None))  # warm first: a slow connect is an outage too
    index = ResilientIndex(inner, retry_after_s=0.001, fail_fast_after=1)
    try:
        caplog.set_level(logging.INFO, logger="cache_router.index")
        for _ in range(5):  # five short outages in a row
            own_redis.pause()
            with pytest.raises(IndexUnavailable):
                await index.lookup(KEYS)
            assert index.degraded
            own_redis.resume()
            await until_ok(lambda: index.lookup(KEYS))
            assert not index.degraded
        msgs = [r.getMessage() for r in caplog.records if r.name == "cache_router.index"]
        assert sum("unavailable" in m for m in msgs) == 1, msgs
        assert sum("recovered" in m for m in msgs) == 1, msgs
        # a long outage inside the quiet period is still reported
        own_redis.pause()
        t_end = time.monotonic() + 1.3
        while time.monotonic() < t_end:
            with pytest.raises(IndexUnavailable):
                await index.lookup(KEYS)
            await asyncio.sleep(0.02)
        msgs = [r.getMessage() for r in caplog.records if r.name == "cache_router.index"]
        assert sum("unavailable" in m for m in msgs) == 2, msgs
        assert "4 short outages" in msgs[-1], msgs
    finally:
        own_redis.resume()
        await index.close()


async def test_one_missed_deadline_is_not_an_outage(own_redis: RedisServer, namespace: str) -> None:
    """By default an outage is three failed calls in a row: one slow call on a busy machine
    must not send the next quarter second of requests without the index."""
    inner = RedisBlockIndex.from_url(own_redis.url, namespace=namespace, deadline_ms=DEADLINE_MS)
    index = ResilientIndex(inner, retry_after_s=1.0)
    try:
        await until_ok(lambda: index.record(A, KEYS, ttl_s=None))
        own_redis.pause()
        with pytest.raises(IndexUnavailable):
            await index.lookup(KEYS)
        own_redis.resume()
        assert not index.degraded
        assert await index.lookup(KEYS) == {A: len(KEYS)}  # answered, not failed fast
        own_redis.pause()
        for _ in range(3):
            with pytest.raises(IndexUnavailable):
                await index.lookup(KEYS)
        assert index.degraded  # three in a row: now it is an outage
        own_redis.resume()
        t0 = time.monotonic()
        with pytest.raises(IndexUnavailable, match="failing fast"):
            await index.lookup(KEYS)
        assert time.monotonic() - t0 < 0.05
    finally:
        own_redis.resume()
        await index.close()
