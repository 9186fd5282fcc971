"""The in-process BlockIndex: the embedded default when no Redis is configured.

Per replica an insertion-ordered dict (key -> expiry) doubles as its LRU list; a
global dict (key -> replicas) answers lookups. Both change together, so clearing a
replica walks only its own entries. Everything is synchronous under the hood: one
event loop owns it, and no call awaits midway, so no lock is needed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from itertools import compress, islice, repeat, takewhile
from operator import is_, itemgetter

from router.types import BackendId, BlockKey

_NEVER = math.inf
_GONE = -math.inf
REFRESH_EVERY_S = 1.0
"""A TTL'd key recorded again within this long (or a tenth of its TTL) of its last recording
keeps its expiry and place: hot prefixes' expiry and LRU recency lag by at most this much
(the contract's item 2; ``ResilientIndex`` does the same for remote indexes)."""


def refresh_due(expiry: float, ttl_s: float | None, every_s: float = REFRESH_EVERY_S) -> float:
    """A key recorded again with ``expiry`` needs writing only if its current expiry is below
    this: within ``every_s`` (a tenth of a shorter TTL) of the new one it is recent enough."""
    return expiry - (every_s if ttl_s is None else min(every_s, ttl_s / 10))


class MemoryBlockIndex:
    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._holders: dict[BlockKey, dict[BackendId, float]] = {}
        self._lru: dict[BackendId, dict[BlockKey, float]] = {}
        self._capacity: dict[BackendId, int | None] = {}

    async def lookup(self, keys: Sequence[BlockKey]) -> Mapping[BackendId, int]:
        return self.lookup_now(keys)

    def lookup_now(self, keys: Sequence[BlockKey]) -> dict[BackendId, int]:
        # Only replicas holding the first block can have a run; each walks its own run in one
        # C-level pass (its expiry of each key, 0.0 when absent, while later than now), so a
        # long prompt costs tens of nanoseconds per held block, not a set operation per block.
        if not keys:
            return {}
        holders = self._holders.get(keys[0])
        if not holders:
            return {}
        now = self._clock()
        runs: dict[BackendId, int] = {}
        for replica in holders:
            run = len(list(takewhile(now.__lt__, map(self._lru[replica].get, keys, repeat(0.0)))))
            if run:
                runs[replica] = run
        return runs

    async def record(self, replica: BackendId, keys: Sequence[BlockKey], *, ttl_s: float | None) -> None:
        self.record_now(replica, keys, ttl_s=ttl_s)

    def record_now(self, replica: BackendId, keys: Sequence[BlockKey], *, ttl_s: float | None,
                   exact: bool = False) -> int:
        """``record`` without the coroutine: nothing here waits or fails. Returns how many of
        ``keys`` it wrote (0: all were recorded moments ago, see REFRESH_EVERY_S; ``exact``:
        refreshed however recent, as a batch of records merged into one must be)."""
        expiry = _NEVER if ttl_s is None else self._clock() + ttl_s
        lru = self._lru.setdefault(replica, {})
        if ttl_s is not None and keys and not exact:
            # Every request records its whole prompt, so a shared prefix was usually recorded
            # moments ago: its leading run of recent keys stays as it is, and only the rest is
            # taken out and put back below (2k-token prompts with a hot prefix: 20 -> 8 µs).
            recent = self._recent_run(lru, keys, refresh_due(expiry, ttl_s), expiry)
            if recent:
                keys = keys[recent:]
                if not keys:
                    return 0
        olds = list(map(lru.pop, keys, repeat(None)))
        lru.update(dict.fromkeys(keys, expiry))
        fresh = olds.count(None)
        held = olds if not fresh else [old for old in olds if old is not None]
        if held and max(held) > expiry:
            for key, old in zip(keys, olds, strict=True):
                if old is not None and old > lru[key]:
                    lru[key] = old
        if fresh:
            holders = self._holders
            for key in compress(keys, map(is_, olds, repeat(None))):
                holders.setdefault(key, {})[replica] = expiry
        self._trim(replica)
        return len(keys)

    @staticmethod
    def _recent_run(lru: dict[BlockKey, float], keys: Sequence[BlockKey], due: float, expiry: float) -> int:
        """Length of the leading run of ``keys`` held with an expiry in [due, expiry]; 0 when
        there is none or the held keys are not one leading run (then everything is recorded)."""
        lo, hi = 0, len(keys)
        while lo < hi:  # held keys are usually one leading run (a chain recorded together)
            mid = (lo + hi) // 2
            if keys[mid] in lru:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return 0
        try:
            olds = itemgetter(*keys[:lo])(lru) if lo > 1 else (lru[keys[0]],)
        except KeyError:  # a gap inside: not one run
            return 0
        return lo if min(olds) >= due and max(olds) <= expiry else 0

    async def remove(self, replica: BackendId, keys: Sequence[BlockKey]) -> None:
        self.remove_now(replica, keys)

    def remove_now(self, replica: BackendId, keys: Sequence[BlockKey]) -> None:
        lru = self._lru.get(replica)
        if lru is None:
            return
        for key in keys:
            if lru.pop(key, None) is not None:
                self._drop_holder(key, replica)

    async def clear(self, replica: BackendId) -> int:
        lru = self._lru.pop(replica, None)
        if not lru:
            return 0
        for key in lru:
            self._drop_holder(key, replica)
        return len(lru)

    async def clear_all(self) -> None:
        self._holders.clear()
        self._lru.clear()

    async def set_capacity(self, replica: BackendId, blocks: int | None) -> None:
        self._capacity[replica] = blocks
        self._trim(replica)

    async def sizes(self) -> Mapping[BackendId, int]:
        return {replica: len(lru) for replica, lru in self._lru.items() if lru}

    async def purge_expired(self) -> int:
        now = self._clock()
        purged = 0
        for replica, lru in list(self._lru.items()):
            dead = [k for k, exp in lru.items() if exp <= now]
            for key in dead:
                del lru[key]
                self._drop_holder(key, replica)
            purged += len(dead)
        return purged

    async def close(self) -> None:
        return None

    def _trim(self, replica: BackendId) -> None:
        cap = self._capacity.get(replica)
        lru = self._lru.get(replica)
        if cap is None or lru is None:
            return
        excess = len(lru) - cap
        if excess <= 0:
            return
        # The oldest, taken in one pass: deleting from a dict's front one ``next(iter())`` at a
        # time rescans the deleted slots each time (a 100k-key trim took 3.7 s, now 80 ms).
        for key in list(islice(lru, excess)):
            del lru[key]
            self._drop_holder(key, replica)

    def _drop_holder(self, key: BlockKey, replica: BackendId) -> None:
        holders = self._holders.get(key)
        if holders is not None:
            holders.pop(replica, None)
            if not holders:
                del self._holders[key]
