"""When a simulated request runs: slots, a FIFO waiting queue, and the engine's compute timeline.

The model, and why:

- ``max_num_seqs`` slots. A request is admitted when it heads the FIFO queue, a slot is
  free and the block pool can hold it at its longest (blocks are reserved up front, so a
  running request never needs preemption). Head-of-line blocking is vLLM's FCFS policy.
- Prefill takes ``prefill_base_ms + prefill_ms_per_token * uncached_tokens`` and occupies the
  engine's single compute timeline: prefills run one after another and running decodes
  stall behind them. So a cache miss costs the whole engine throughput, not only the
  missing request's latency, which is what makes cache-aware routing pay on a real engine.
- Each decode step waits ``decode_ms`` plus ``decode_ms_per_seq`` per running request (a bigger
  batch steps slower), then for any prefill that holds the engine.
- ``zero``: no waiting at all (load tests of the router itself, benchmarks).

It owns admission and time; the cache model decides blocks, the engine decides tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from loadtest.engine.cache import PrefixCache, SeqBlocks


@dataclass(frozen=True)
class TimingConfig:
    # Sized like a small model on one accelerator, scaled so a 2k-token miss (~40 ms)
    # is clearly slower than a hit (~1 ms) while tests stay fast.
    prefill_base_ms: float = 1.0
    prefill_ms_per_token: float = 0.02
    decode_ms: float = 5.0
    # A decode step of a bigger batch takes longer (memory-bound reads of every sequence's KV), so
    # an engine that gets all the traffic slows down: 64 running requests add 6.4 ms per token.
    decode_ms_per_seq: float = 0.1
    max_num_seqs: int = 64  # vLLM's default is larger; 64 makes queueing visible in load tests
    zero: bool = False


@dataclass(eq=False)
class _Waiter:
    seq: SeqBlocks
    need: int
    future: asyncio.Future[int]


class Scheduler:
    """Admission and the compute timeline of one engine (one event loop owns it)."""

    def __init__(self, cache: PrefixCache, config: TimingConfig, on_step: Callable[[], None]) -> None:
        self.cache = cache
        self.config = config
        self._on_step = on_step
        self._waiting: deque[_Waiter] = deque()
        self._running: dict[int, tuple[SeqBlocks, int]] = {}  # id(seq) -> (seq, blocks at its longest)
        self._busy_until = 0.0
        self.prefill_seconds = 0.0
        self._busy_since: float | None = None
        self._busy_total = 0.0

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def busy_seconds(self) -> float:
        """Wall time with at least one running request (the engine's busy share numerator)."""
        extra = time.monotonic() - self._busy_since if self._busy_since is not None else 0.0
        return self._busy_total + extra

    def fits_ever(self, seq: SeqBlocks, max_tokens: int) -> bool:
        return seq.blocks_needed(max_tokens) <= self.cache.num_blocks

    async def admit(self, seq: SeqBlocks, max_tokens: int) -> int:
        """Wait in FIFO order for a slot and room; returns the prompt's cached blocks."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(seq, seq.blocks_needed(max_tokens), future)
        self._waiting.append(waiter)
        self._pump()
        try:
            return await future
        except BaseException:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
            elif future.done() and not future.cancelled():
                self.finish(seq)  # admitted just as the caller went away
            raise

    def finish(self, seq: SeqBlocks) -> None:
        if self._running.pop(id(seq), None) is None:
            return
        seq.release()
        if not self._running and self._busy_since is not None:
            self._busy_total += time.monotonic() - self._busy_since
            self._busy_since = None
        self._pump()

    def abort_all(self) -> None:
        """A restart: waiters fail, running requests are forgotten (their cache is gone)."""
        while self._waiting:
            w = self._waiting.popleft()
            if not w.future.done():
                w.future.set_exception(ConnectionAbortedError("engine restarted"))
        self._running.clear()
        self._busy_since = None

    def _reserved(self) -> int:
        return sum(need - len(seq.block_ids) for seq, need in self._running.values())

    def _pump(self) -> None:
        admitted = False
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            head = self._waiting[0]
            if head.future.done():
                self._waiting.popleft()
                continue
            seq = head.seq
            hits = self.cache.lookup(seq.digests, seq.prompt_len)
            if self.cache.free_after_touch(seq.digests[:hits]) - self._reserved() < head.need - hits:
                break
            self._waiting.popleft()
            seq.schedule_prefill(hits)
            self._running[id(seq)] = (seq, head.need)
            if self._busy_since is None:
                self._busy_since = time.monotonic()
            head.future.set_result(hits)
            admitted = True
        if admitted:
            self._on_step()

    async def prefill(self, uncached_tokens: int) -> None:
        """Occupy the engine's compute for the uncached part of a prompt."""
        if self.config.zero:
            return
        duration = (self.config.prefill_base_ms + self.config.prefill_ms_per_token * uncached_tokens) / 1000
        now = time.monotonic()
        start = max(now, self._busy_until)
        self._busy_until = start + duration
        self.prefill_seconds += duration
        await asyncio.sleep(self._busy_until - now)

    async def decode_step(self) -> None:
        """One inter-token interval, stretched by any prefill holding the engine."""
        if self.config.zero:
            return
        await asyncio.sleep(
            (self.config.decode_ms + self.config.decode_ms_per_seq * len(self._running)) / 1000
        )
        stall = self._busy_until - time.monotonic()
        if stall > 0:
            await asyncio.sleep(stall)
