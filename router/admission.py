"""Admission control: a bounded router queue with a deadline in front of per-replica caps.

Each replica takes at most ``admission.max_concurrency_per_backend`` requests at once (the
scheduler's filter drops replicas at their cap). When every replica that could serve a
request is at its cap, the request waits here for a slot, in a queue of at most
``queue_size`` (past it: 429) for at most ``queue_timeout_s`` (past it: 503); both carry
Retry-After. A slot is held until the stream ends: whoever releases one calls ``notify()``.

This module owns waiting; it refuses to own choosing (the scheduler) or counting slots (the fleet).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from router import metrics
from router.config import AdmissionConfig
from router.errors import Overloaded, TooManyRequests


class AdmissionQueue:
    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self._changed = asyncio.Condition()
        self.waiting = 0

    @property
    def capped(self) -> bool:
        return self.config.max_concurrency_per_backend is not None

    def enter(self) -> float:
        """Join the queue; returns the absolute deadline (monotonic). Raises TooManyRequests when full."""
        if self.waiting >= self.config.queue_size:
            metrics.REJECTED.labels("queue_full").inc()
            raise TooManyRequests("the router's queue is full; retry later", retry_after=1.0)
        self.waiting += 1
        metrics.QUEUE_DEPTH.set(self.waiting)
        return time.monotonic() + self.config.queue_timeout_s

    def leave(self) -> None:
        self.waiting -= 1
        metrics.QUEUE_DEPTH.set(self.waiting)

    async def wait(self, deadline: float) -> None:
        """Wait until a slot may have freed, or raise Overloaded at the deadline."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            metrics.REJECTED.labels("deadline").inc()
            raise Overloaded("no replica had a free slot before the queue deadline", retry_after=1.0)
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel (a client that
        # left) arriving just as the condition is notified.
        with contextlib.suppress(TimeoutError):  # re-check: slots also free up through other routers
            async with asyncio.timeout(min(remaining, 0.5)), self._changed:
                await self._changed.wait()

    def notify(self) -> None:
        """A slot was released somewhere: wake the waiters to try again."""
        if self.waiting:
            asyncio.get_running_loop().create_task(self._notify_all(), name="admission-notify")

    async def _notify_all(self) -> None:
        async with self._changed:
            self._changed.notify_all()
