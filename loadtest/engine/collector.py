"""When Python's cyclic garbage collector may pause a load-test process: only while nothing is measured.

Why: a full (generation-2) collection stops the whole interpreter. Measured in the demo
(gc.callbacks in every process, 2026-11-29): 50-90 ms in the simulated engines' process and
55-155 ms in the load generator, landing inside a 4-second arm. All simulated engines share
one process, so one pause stalls every engine at once: the slowest requests of a run were
the ones in flight during such a pause, whatever the routing policy. A real fleet has no
such coupling (each engine is its own process on its own accelerator), and a load
generator's own pauses are measurement error. So the two processes that stand in for the
fleet and the client do their full collections while idle:

- ``settle()``: collect everything now, then ``gc.freeze()`` the survivors (modules, the
  tokenizer's vocabulary, the workload, earlier results): later collections never scan them.
- ``young_only()``: while a run is measured, only young collections (cheap, bounded by what
  the run allocates) happen; full ones wait for the next ``settle()``.
- ``IdleCollector``: for the engines' process, which cannot know where arms begin: it
  settles whenever every engine has been idle for a moment, and at the latest every
  ``max_interval_s`` (a pause then, but no unbounded growth in a long busy run).

Reference counting still frees everything acyclic at once; only cyclic garbage waits.
It owns the collector's settings of the process it runs in, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator

from router.tasks import cancel_and_wait

log = logging.getLogger(__name__)

NO_FULL = 1 << 30
"""Generation-2 threshold that never trips: full collections only through ``settle()``."""


def settle() -> float:
    """Collect now and freeze what survives; returns the seconds it took (a pause, so call it idle)."""
    t0 = time.perf_counter()
    gc.unfreeze()  # earlier frozen objects may be garbage by now (a finished run's results)
    gc.collect()
    gc.freeze()
    return time.perf_counter() - t0


@contextlib.contextmanager
def young_only() -> Iterator[None]:
    """No full collection inside the block (young generations still collected); restored after."""
    before = gc.get_threshold()
    gc.set_threshold(before[0], before[1], NO_FULL)
    try:
        yield
    finally:
        gc.set_threshold(*before)


class IdleCollector:
    """Settles the process whenever ``idle()`` has held for ``quiet_s``; no full collection otherwise."""

    def __init__(self, idle: Callable[[], bool], *, quiet_s: float = 0.2, max_interval_s: float = 60.0,
                 poll_s: float = 0.05) -> None:
        self.idle = idle
        self.quiet_s = quiet_s
        self.max_interval_s = max_interval_s
        self.poll_s = poll_s
        self.settled = 0
        self.pause_s = 0.0
        self._task: asyncio.Task[None] | None = None
        self._threshold = gc.get_threshold()

    def start(self) -> None:
        settle()
        gc.set_threshold(self._threshold[0], self._threshold[1], NO_FULL)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-idle-collector")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        gc.set_threshold(*self._threshold)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last = idle_since = loop.time()
        dirty = False  # requests ran since the last settle: there may be cyclic garbage
        try:
            while True:
                await asyncio.sleep(self.poll_s)
                now = loop.time()
                if not self.idle():
                    idle_since, dirty = now, True
                    if now - last < self.max_interval_s:
                        continue
                elif not dirty or now - idle_since < self.quiet_s:
                    continue
                self.pause_s += settle()
                self.settled += 1
                last, dirty = loop.time(), False
        except asyncio.CancelledError:
            log.info("idle collector stopped after %d collections (%.0f ms in all): shutdown",
                     self.settled, 1000 * self.pause_s)
            raise
