"""Feedback after a request: metrics, the decision log line, and what the index learns.

Owns: recording a prompt's keys for the replica it was sent to (short TTL when KV events
will confirm them, ``index.ttl_s`` otherwise), reading the engine's cached tokens, the
stale-hit correction (when the engine cached fewer tokens than predicted, the miss is
charged to the index; the engine has just recomputed and cached the whole prompt, so its
keys are re-credited, not dropped: dropping them would make the next identical prompt a
predicted miss that hits), and the
lost savings per request, in tokens, by cause: ``workload`` = cacheable tokens no replica
held, ``routing`` = what the best holder had beyond the chosen replica (the price of load
balancing), ``index`` = predicted minus engine-reported cached, when positive.

Index writes run as tracked background tasks: they never delay an answer, and a failing
index is only counted (by the index's metrics wrapper), never an error for the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from router.config import RouterConfig
from router.fleet.registry import Fleet
from router.index.base import BlockIndex, IndexUnavailable
from router.index.peers import Peers
from router.index.resilient import ResilientIndex
from router.logs import log_decision
from router.metrics import (
    CACHED_TOKENS,
    LOST_SAVINGS,
    PREDICTED_TOKENS,
    PROMPT_TOKENS,
    REQUEST_SECONDS,
    REQUESTS,
    STALE_HITS,
    TTFT_SECONDS,
)
from router.proxy.forward import Opened
from router.proxy.sse import cached_tokens
from router.types import BackendId, BlockKey

if TYPE_CHECKING:
    from router.pipeline import Routed


class _Series:
    """A (model, arm)'s metric children, looked up once: ``labels()`` costs microseconds per call."""

    def __init__(self, model: str, arm: str) -> None:
        self.seconds = REQUEST_SECONDS.labels(model, arm)
        self.ttft = TTFT_SECONDS.labels(model, arm)
        self.prompt = PROMPT_TOKENS.labels(model, arm)
        self.predicted = PREDICTED_TOKENS.labels(model, arm)
        self.cached = CACHED_TOKENS.labels(model, arm)
        self.lost = {c: LOST_SAVINGS.labels(model, arm, c) for c in ("workload", "routing", "index")}


@functools.cache
def _series(model: str, arm: str) -> _Series:
    return _Series(model, arm)  # bounded: models are checked against the fleet before this


@functools.cache
def requests_child(backend: str, model: str, arm: str, outcome: str) -> Any:
    """REQUESTS' child, looked up once: bounded by replicas x models x arms x outcomes, and
    never removed (a gone replica's request count stays a true count)."""
    return REQUESTS.labels(backend, model, arm, outcome)


class Feedback:
    def __init__(self, config: RouterConfig, index: BlockIndex, fleet: Fleet, peers: Peers | None = None) -> None:
        self.config = config
        self.index = index
        self.fleet = fleet
        self.peers = peers
        """Sibling worker processes sharing this in-process index (``serve --workers N``
        without Redis): what is written here is sent to them too."""
        self._tasks: set[asyncio.Task[None]] = set()
        local = index.local if isinstance(index, ResilientIndex) else None
        self._record_now = local.record_now if local is not None else None

    @staticmethod
    def predicted(r: Routed, backend: BackendId) -> int:
        """Tokens the index predicted ``backend`` holds, capped like the engine's report."""
        g = r.gathered
        return min(g.matched.get(backend, 0), g.enc.cacheable_blocks) * g.enc.block_size

    def finish(self, r: Routed, opened: Opened | None, usage: Mapping[str, Any] | None) -> None:
        req, g, d = r.req, r.gathered, r.decision
        backend = opened.backend if opened is not None else d.backend
        now = time.monotonic()
        requests_child(backend, req.model, r.arm, r.outcome).inc()
        series = _series(req.model, r.arm)
        series.seconds.observe(now - r.started)
        if opened is not None:
            series.ttft.observe(opened.first_byte_at - r.started)
        if opened is not None and opened.status == 200:
            self._feedback(r, backend, usage)
        elif r.outcome != "cancelled":
            self._forget(r, backend)  # refused or failed: the replica cached nothing of this prompt
        if opened is not None and opened.backend != d.backend:
            self._forget(r, d.backend)  # the first pick failed before answering
        log_decision(self.config.log_decisions, r.request_id, req.model, g.enc, g.index_available, d, r.arm,
                     r.outcome, r.status or 0, r.started,
                     backend=backend, cached=r.cached, attempts=opened.attempts if opened else 0)

    def _feedback(self, r: Routed, backend: BackendId, usage: Mapping[str, Any] | None) -> None:
        g, d, model, arm = r.gathered, r.decision, r.req.model, r.arm
        bs = g.enc.block_size
        predicted = self.predicted(r, backend)
        cacheable = g.enc.cacheable_blocks * bs
        series = _series(model, arm)
        series.prompt.inc(g.enc.prompt_tokens)
        series.predicted.inc(predicted)
        series.lost["workload"].inc(max(0, cacheable - d.best_matched_tokens))
        series.lost["routing"].inc(max(0, d.best_matched_tokens - predicted))
        cached = cached_tokens(dict(usage)) if usage is not None else None
        r.cached = cached
        if cached is None:
            return
        series.cached.inc(cached)
        # Estimates (approximate mode) and batches of prompts cannot be compared with the engine.
        if g.enc.approximate or r.req.n_prompts != 1 or cached >= predicted:
            return
        series.lost["index"].inc(predicted - cached)
        STALE_HITS.labels(backend).inc()
        b = self.fleet.get(backend)
        if b is not None and b.precise:
            return  # the engine's BlockStored for this very prompt has re-confirmed its blocks
        # Approximate mode: the blocks past ``cached`` were gone when the request arrived and
        # were prefilled again by it; refresh them so their TTL and recency start now.
        self.record(backend, g.enc.keys[cached // bs:])

    def record(self, backend: BackendId, keys: list[BlockKey]) -> None:
        if not keys:
            return
        b = self.fleet.get(backend)
        ttl = self.config.index.speculative_ttl_s if b is not None and b.precise else self.config.index.ttl_s
        if self._record_now is not None:  # in-process: no task, nothing to wait for or fail
            # Nothing written: every key was recorded moments ago, and sent to the sibling
            # workers then (they keep the same refresh interval).
            if self._record_now(backend, keys, ttl_s=ttl) and self.peers is not None:
                self.peers.record(backend, keys, ttl_s=ttl)
            return
        self._spawn(self._index_call(self.index.record(backend, keys, ttl_s=ttl)), "index-record")

    def _forget(self, r: Routed, backend: BackendId) -> None:
        """Undo ``record`` for a replica that did not serve the prompt: drop the keys past
        what the index already credited it with before this request."""
        g = r.gathered
        keys = g.enc.keys[g.matched.get(backend, 0):]
        if keys:
            self._spawn(self._drop(backend, keys), "index-forget")

    async def _drop(self, backend: BackendId, keys: list[BlockKey]) -> None:
        await self._index_call(self.index.remove(backend, keys))
        if self.peers is not None:
            self.peers.remove(backend, keys)

    @staticmethod
    async def _index_call(call: Awaitable[None]) -> None:
        with contextlib.suppress(IndexUnavailable):  # fail open; the index wrapper counts it
            await call

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        # loop.create_task, not ensure_future: the same task without the generic checks.
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for pending index writes (shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
