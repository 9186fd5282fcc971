"""One replica's map from the engine's block hash to the router's key (pure, no I/O).

Owns what the applier must remember per engine block to apply later events: the router
key (so a BlockRemoved can be applied and a BlockStored's parent placed in the chain), when
it was stored (retention), and in which media it lives (GPU, CPU tiers). It does not own
the index: every method returns the router keys the caller must record or remove.

Bounded: beyond ``limit`` entries the oldest-stored are forgotten and their keys returned
for removal from the index (a removal we could no longer apply must not leave a stale hit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from router.events.decode import EngineHash
from router.types import BlockKey

GPU = 1
_MAX_MEDIA_BITS = 16  # beyond 16 tiers, unknown media share the last bit: bounded memory


@dataclass(slots=True)
class _Entry:
    key: BlockKey
    stored_at: float
    media: int
    held: bool  # credited to the replica in the index


class BlockMap:
    def __init__(self, limit: int, *, record_cpu_blocks: bool = False) -> None:
        self.limit = limit
        self.record_cpu_blocks = record_cpu_blocks
        """A block only in a non-GPU tier counts as held (recorded in the index) when True."""
        self._entries: dict[EngineHash, _Entry] = {}  # insertion order: oldest stored first
        self._bits: dict[str, int] = {"GPU": GPU}

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, engine_hash: EngineHash) -> BlockKey | None:
        entry = self._entries.get(engine_hash)
        return entry.key if entry is not None else None

    def store(self, hashes: Sequence[EngineHash], keys: Sequence[BlockKey], medium: str | None,
              now: float) -> list[BlockKey]:
        """Blocks now in ``medium``; returns the keys to record as held."""
        bit = self.bit(medium)
        counts = bit == GPU or self.record_cpu_blocks
        held: list[BlockKey] = []
        for h, key in zip(hashes, keys, strict=True):
            entry = self._entries.pop(h, None)
            if entry is None or entry.key != key:
                entry = _Entry(key, now, 0, False)
            entry.media |= bit
            if counts:
                entry.held = True
                held.append(key)
            self._entries[h] = entry  # re-inserted: most recently stored last
        return held

    def remove(self, hashes: Sequence[EngineHash], medium: str | None,
               now: float) -> tuple[list[BlockKey], list[float]]:
        """Blocks gone from ``medium``: (keys no longer held, how long each was held)."""
        bit = self.bit(medium)
        gone: list[BlockKey] = []
        ages: list[float] = []
        for h in hashes:
            entry = self._entries.get(h)
            if entry is None:
                continue  # never seen (or forgotten): nothing of ours to undo
            entry.media &= ~bit
            still = bool(entry.media & GPU) or (self.record_cpu_blocks and entry.media != 0)
            if entry.held and not still:
                entry.held = False
                gone.append(entry.key)
                ages.append(now - entry.stored_at)
            if entry.media == 0:
                del self._entries[h]
        return gone, ages

    def trim(self) -> list[BlockKey]:
        """Forget the oldest entries beyond the limit; returns their keys that were held."""
        excess = len(self._entries) - self.limit
        if excess <= 0:
            return []
        dropped: list[BlockKey] = []
        for h in list(self._entries)[:excess]:
            entry = self._entries.pop(h)
            if entry.held:
                dropped.append(entry.key)
        return dropped

    def clear(self) -> None:
        self._entries.clear()

    def bit(self, medium: str | None) -> int:
        if medium is None:
            return GPU
        bit = self._bits.get(medium)
        if bit is None:
            bit = 1 << min(len(self._bits), _MAX_MEDIA_BITS)
            self._bits[medium] = bit
        return bit
