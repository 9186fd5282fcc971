"""The Redis client every index part shares: plain or Cluster from one URL, no retries of its own.

Owns how a URL becomes a client (``redis+cluster://`` or ``cluster=True`` selects Redis
Cluster) and which exceptions mean "Redis did not answer". Deadlines are the caller's:
each call runs under ``asyncio.timeout``, so the client never retries (a retry would only
spend the deadline twice) and a connection cut by a timeout is simply replaced on the next
call, which is how the index reconnects by itself.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry  # the asyncio clients' own (redis-py 8 warns at a sync one)
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)
"""Everything a call to Redis can raise when Redis is down, slow, restarting or failing over."""


def split_cluster_url(url: str) -> tuple[str, bool]:
    for scheme in ("redis+cluster://", "rediss+cluster://"):
        if url.startswith(scheme):
            return url.replace("+cluster", "", 1), True
    return url, False


def connect(
    url: str, *, deadline_ms: float, cluster: bool | None = None, max_connections: int = 256
) -> tuple[Any, bool]:
    """An asyncio client (plain or Cluster); returns (client, is_cluster)."""
    plain, by_scheme = split_cluster_url(url)
    is_cluster = by_scheme if cluster is None else cluster
    common: dict[str, Any] = {
        "socket_connect_timeout": max(deadline_ms / 1000.0, 0.05),
        "retry": Retry(NoBackoff(), 0),
        "max_connections": max_connections,
    }
    if is_cluster:
        return RedisCluster.from_url(plain, **common), True
    return aioredis.Redis.from_url(plain, health_check_interval=0, **common), False
