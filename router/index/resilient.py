"""Metrics and fail-fast around any BlockIndex: latency, errors, degraded state, one log line per change.

Owns what the router tells operators about its index: ``cache_router_index_lookup_seconds``,
``cache_router_index_errors{op}``, ``cache_router_index_degraded`` and
``cache_router_index_blocks`` (refreshed by ``sizes()``), and a warning when the index
becomes unreachable and an info line when it is back, never one per request.

While degraded it fails fast: for ``retry_after_s`` after a failure, calls raise
``IndexUnavailable`` at once instead of each spending the full deadline on a Redis that
is down or paused; then the next call probes again. The contract is unchanged (item 7):
callers still see only ``IndexUnavailable`` and route without the index. Refilling after
Redis comes back empty needs nothing special: every routed request records its keys again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from router.index.base import BlockIndex, IndexUnavailable
from router.index.memory import REFRESH_EVERY_S, MemoryBlockIndex, refresh_due
from router.metrics import INDEX_BLOCKS, INDEX_DEGRADED, INDEX_ERRORS, INDEX_LOOKUP_SECONDS
from router.types import BackendId, BlockKey

log = logging.getLogger("cache_router.index")
T = TypeVar("T")

RETRY_AFTER_S = 0.25
"""Fail-fast window after a failure: short enough that routing is warm again within a
second of Redis returning, long enough that a paused Redis costs one deadline per window,
not one per request."""


FAIL_FAST_AFTER = 3
"""Failed calls in a row that make an outage (and start failing fast). With one, a single
call that missed its deadline on a busy machine sent the next 250 ms of requests (about
half of them at 1,000 req/s) without the index."""
RECENT_MAX = 100_000
"""Keys remembered per replica (about 10 MB); past it the memory starts over."""
FLAP_QUIET_S = 30.0
"""After an outage is reported, new short outages within this are counted, not logged one by one."""
SUSTAINED_S = 1.0
"""An outage that lasts this long is reported even inside the quiet period."""


class ResilientIndex:
    def __init__(
        self,
        inner: BlockIndex,
        *,
        retry_after_s: float = RETRY_AFTER_S,
        metrics: bool = True,
        clock: Callable[[], float] = time.monotonic,
        refresh_every_s: float = REFRESH_EVERY_S,
        fail_fast_after: int = FAIL_FAST_AFTER,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self._retry_after = retry_after_s
        self._metrics = metrics
        self._clock = clock
        self._degraded_since: float | None = None
        self._retry_at = 0.0
        self._failed = 0
        self._logged = False  # the current outage was reported
        self._cause: IndexUnavailable | None = None
        self._flaps = 0  # outages not reported since the last report
        self._quiet_until = 0.0
        self._lookup_seconds = INDEX_LOOKUP_SECONDS.labels(inner.name)
        # Remote indexes only (the in-process one is cheaper to write than to filter).
        self._recent: dict[BackendId, dict[BlockKey, float]] | None = (
            None if isinstance(inner, MemoryBlockIndex) or refresh_every_s <= 0 else {})
        self._refresh_every = refresh_every_s
        self._fail_fast_after = max(1, fail_fast_after)
        self._streak = 0  # failed calls in a row (fail-fast ones not counted)

    @property
    def degraded(self) -> bool:
        return self._degraded_since is not None

    async def lookup(self, keys: Sequence[BlockKey]) -> Mapping[BackendId, int]:
        t0 = time.perf_counter()
        try:
            return await self._guard("lookup", lambda: self.inner.lookup(keys))
        finally:
            if self._metrics:
                self._lookup_seconds.observe(time.perf_counter() - t0)

    @property
    def local(self) -> MemoryBlockIndex | None:
        """The in-process index inside, if that is what this wraps: its ``lookup_now`` and
        ``record_now`` cannot fail or wait, so the hot path calls them without a coroutine
        (or a task) per request; lookups still go through ``observe_lookup``."""
        return self.inner if isinstance(self.inner, MemoryBlockIndex) else None

    def observe_lookup(self, seconds: float) -> None:
        if self._metrics:
            self._lookup_seconds.observe(seconds)

    async def record(self, replica: BackendId, keys: Sequence[BlockKey], *, ttl_s: float | None) -> None:
        recent = self._recent
        if recent is None:
            await self._guard("record", lambda: self.inner.record(replica, keys, ttl_s=ttl_s))
            return
        # A shared prefix is recorded by every request that carries it. Refreshing its
        # expiry and recency once per ``refresh_every_s`` is as good for routing and spares
        # Redis the work: 125 keys per 2k-token prompt cost ~1 ms of Redis CPU per record,
        # which saturated Redis near 1,000 req/s and let the index deadline trip on most calls.
        # Remembered per key: the expiry this router last gave it. A key is sent again once
        # that falls short of the new expiry by more than the refresh interval, so a longer
        # TTL (an engine's confirmation: no expiry) always goes through at once.
        now = self._clock()
        mine = recent.setdefault(replica, {})
        expiry = math.inf if ttl_s is None else now + ttl_s
        due = refresh_due(expiry, ttl_s, self._refresh_every)
        todo = [k for k in keys if mine.get(k, -math.inf) < due]
        if not todo:
            return
        await self._guard("record", lambda: self.inner.record(replica, todo, ttl_s=ttl_s))
        if len(mine) > RECENT_MAX:
            mine.clear()  # bounded; the next records just refresh once more
        mine.update(dict.fromkeys(todo, expiry))

    async def remove(self, replica: BackendId, keys: Sequence[BlockKey]) -> None:
        if self._recent is not None and (mine := self._recent.get(replica)):
            for k in keys:
                mine.pop(k, None)
        await self._guard("remove", lambda: self.inner.remove(replica, keys))

    async def clear(self, replica: BackendId) -> int:
        if self._recent is not None:
            self._recent.pop(replica, None)
        n = await self._guard("clear", lambda: self.inner.clear(replica))
        if self._metrics:
            INDEX_BLOCKS.labels(replica).set(0)
        return n

    async def clear_all(self) -> None:
        if self._recent is not None:
            self._recent.clear()
        await self._guard("clear", self.inner.clear_all)

    async def set_capacity(self, replica: BackendId, blocks: int | None) -> None:
        await self._guard("capacity", lambda: self.inner.set_capacity(replica, blocks))

    async def sizes(self) -> Mapping[BackendId, int]:
        sizes = await self._guard("sizes", self.inner.sizes)
        if self._metrics:
            for replica, n in sizes.items():
                INDEX_BLOCKS.labels(replica).set(n)
        return sizes

    async def purge_expired(self) -> int:
        return await self._guard("purge", self.inner.purge_expired)

    async def close(self) -> None:
        await self.inner.close()

    async def _guard(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        if self._degraded_since is not None and self._clock() < self._retry_at:
            self._note_failure(op)
            raise IndexUnavailable("index degraded: failing fast until the next probe")
        try:
            result = await call()
        except IndexUnavailable as exc:
            self._note_failure(op, exc)
            raise
        self._streak = 0
        if self._degraded_since is not None:
            if self._logged:
                log.info(
                    "index %s recovered after %.1fs (%d calls routed without it)",
                    self.name,
                    self._clock() - self._degraded_since,
                    self._failed,
                )
            self._flaps += 0 if self._logged else 1
            self._degraded_since, self._failed = None, 0
            if self._metrics:
                INDEX_DEGRADED.set(0)
        return result

    def _note_failure(self, op: str, exc: IndexUnavailable | None = None) -> None:
        now = self._clock()
        self._failed += 1
        if self._metrics:
            INDEX_ERRORS.labels(op).inc()
        if exc is not None:
            self._streak += 1
            if self._streak < self._fail_fast_after and self._degraded_since is None:
                return  # one slow call (a GC pause, a stalled loop) is not an outage
            self._retry_at = now + self._retry_after
            if self._degraded_since is None:
                self._degraded_since, self._logged, self._cause = now, False, exc
                if self._metrics:
                    INDEX_DEGRADED.set(1)
        if self._degraded_since is None or self._logged:
            return
        # One warning per outage. An index that flaps (a deadline on the edge of Redis's
        # latency) reports at most once per FLAP_QUIET_S, unless an outage lasts SUSTAINED_S.
        if now < self._quiet_until and now - self._degraded_since < SUSTAINED_S:
            return
        since = f" ({self._flaps} short outages since the last report)" if self._flaps else ""
        log.warning(
            "index %s unavailable, routing without it until it answers again: %s%s",
            self.name,
            self._cause,
            since,
        )
        self._logged, self._flaps, self._quiet_until = True, 0, now + FLAP_QUIET_S
