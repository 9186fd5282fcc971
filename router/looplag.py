"""How late this process's event loop runs what is due: the slack a deadline on a remote
call must allow for.

A deadline on a Redis call measures wall time until this loop reads the answer. When the
router is saturated, every await waits a whole loop cycle (tens of ms at 32 concurrent
requests), so a 5-50 ms deadline trips although Redis answered in a fraction of a
millisecond, and the router routes without its index exactly when load is highest (measured:
most lookups failed near 1,000 req/s). ``LoopLag`` times a short sleep every ``interval_s``;
``slack()`` is how late the recent ones woke (the latest, or a decaying memory of a worse
one), which callers add to their deadlines. A Redis that is down or paused still fails
within its deadline plus our own loop's delay, which no deadline could beat anyway.
"""

from __future__ import annotations

import asyncio
import logging

from router.tasks import cancel_and_wait

log = logging.getLogger("cache_router.looplag")

INTERVAL_S = 0.05
DECAY = 0.8
"""Each sample keeps this share of the worst lag seen before it: one long stall is remembered
for a few samples, then forgotten."""
FACTOR = 2.0
"""Slack = FACTOR x lag: a call waits for the loop at least twice (send, then read)."""
CAP_S = 2.0
"""Never more slack than this, whatever the loop does."""


class LoopLag:
    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def slack(self) -> float:
        return min(CAP_S, FACTOR * self.lag_s)

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                t0 = loop.time()
                await asyncio.sleep(self.interval_s)
                late = max(0.0, loop.time() - t0 - self.interval_s)
                self.lag_s = max(late, self.lag_s * DECAY)
        except asyncio.CancelledError:
            log.info("loop-lag stopped: shutdown")
            raise
