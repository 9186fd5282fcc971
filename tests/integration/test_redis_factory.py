"""make_index: the in-process index without redis_url, the wrapped Redis index with it (plain or Cluster)."""

from __future__ import annotations

import pytest

from router.config import RouterConfig
from router.index import MemoryBlockIndex
from router.index.factory import make_index
from router.index.redis import RedisBlockIndex
from router.index.resilient import ResilientIndex
from router.types import BackendId, BlockKey
from tests.support.servers import RedisServer


def test_memory_without_redis_url() -> None:
    assert isinstance(make_index(RouterConfig()), MemoryBlockIndex)


@pytest.mark.parametrize(
    ("url", "flag", "cluster"),
    [
        ("redis://127.0.0.1:1/0", False, False),
        ("redis+cluster://127.0.0.1:1", False, True),
        ("redis://127.0.0.1:1", True, True),
    ],
)
def test_cluster_by_scheme_or_flag(url: str, flag: bool, cluster: bool) -> None:
    index = make_index(RouterConfig.model_validate({"redis_url": url, "index": {"cluster": flag}}))
    assert isinstance(index, ResilientIndex) and isinstance(index.inner, RedisBlockIndex)
    assert index.inner._cluster is cluster


async def test_configured_namespace_and_deadline(redis_server: RedisServer, namespace: str) -> None:
    cfg = RouterConfig.model_validate(
        {"redis_url": redis_server.url, "index": {"namespace": namespace, "deadline_ms": 300}}
    )
    index = make_index(cfg)
    other = RedisBlockIndex.from_url(redis_server.url, namespace=namespace + "x", deadline_ms=300)
    try:
        await index.record(BackendId("http://a:1"), [BlockKey(1), BlockKey(2)], ttl_s=None)
        assert await index.lookup([BlockKey(1), BlockKey(2)]) == {"http://a:1": 2}
        assert await other.lookup([BlockKey(1)]) == {}  # the configured namespace, not a default one
    finally:
        await index.clear_all()
        await index.close()
        await other.close()
