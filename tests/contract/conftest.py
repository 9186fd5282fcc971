"""Backends the index contract runs against. A new backend adds one branch here, nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from loadtest.redis_servers import LocalCluster
from router.index import BlockIndex, IndexUnavailable, MemoryBlockIndex
from router.index.redis import RedisBlockIndex
from tests.support.servers import RedisServer

# Generous for a shared 2-core CI box: the contract is about behaviour, the deadline has its own tests.
TEST_DEADLINE_MS = 2000.0


class FakeClock:
    """A settable clock for TTL tests of the in-process backend."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[str]:
    """A real 3-master Redis Cluster (redis-server --cluster-enabled) for the session; its URL."""
    cluster = LocalCluster().start()
    yield cluster.url
    cluster.stop()


@pytest.fixture(params=["memory", "redis", pytest.param("redis-cluster", marks=pytest.mark.cluster)])
async def index(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[BlockIndex]:
    backend: BlockIndex
    if request.param == "memory":
        backend = MemoryBlockIndex()
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        backend = RedisBlockIndex.from_url(server.url, namespace=namespace, deadline_ms=TEST_DEADLINE_MS)
    elif request.param == "redis-cluster":
        cluster_url: str = request.getfixturevalue("redis_cluster")
        backend = RedisBlockIndex.from_url(cluster_url, namespace=namespace, deadline_ms=TEST_DEADLINE_MS)
    else:  # pragma: no cover - every param needs a branch
        raise AssertionError(request.param)
    await _warm(backend)
    yield backend
    await backend.clear_all()
    await backend.close()


async def _warm(index: BlockIndex) -> None:
    """Connect (and, for a cluster, discover its slots) before the test: a cold start on a busy
    CI box is not what the contract is about."""
    for _ in range(20):
        try:
            await index.sizes()
            return
        except IndexUnavailable:
            await asyncio.sleep(0.1)


@pytest.fixture
def make_index() -> Callable[[], BlockIndex]:
    return MemoryBlockIndex
