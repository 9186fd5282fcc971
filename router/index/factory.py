"""Which index a router gets: in-process by default, the shared Redis one when ``redis_url`` is set.

Owns the choice and the wrapping; the backends own their behaviour. The Redis index is
wrapped in ``ResilientIndex`` (one log line per degraded/recovered change, fail-fast while
Redis is away), so callers see one BlockIndex whatever the deployment. The wrapper is the
one owner of the index metrics (lookup latency, errors, the degraded gauge, blocks per
replica); ``router.app`` wraps the in-process index the same way, and nothing else counts them.
"""

from __future__ import annotations

from collections.abc import Callable

from router.config import RouterConfig
from router.index.base import BlockIndex
from router.index.memory import MemoryBlockIndex
from router.index.redis import RedisBlockIndex
from router.index.resilient import ResilientIndex


def make_index(config: RouterConfig, *, slack: Callable[[], float] = lambda: 0.0) -> BlockIndex:
    """``slack``: extra seconds Redis deadlines allow for this process's event-loop delay."""
    if config.redis_url is None:
        return MemoryBlockIndex()
    cfg = config.index
    redis = RedisBlockIndex.from_url(
        config.redis_url,
        namespace=cfg.namespace,
        deadline_ms=cfg.deadline_ms,
        cluster=True if cfg.cluster else None,  # None: let the URL's scheme decide
        slack=slack,
    )
    return ResilientIndex(redis)
