"""The simulated engine's prefix cache: a block pool managed the way vLLM v1 manages it.

What it models (vLLM's ``BlockPool`` / ``KVCacheManager``, see the fact sheet):

- A fixed pool of ``num_blocks`` blocks. A free queue holds every block no running
  request references, least recently freed first; allocating pops its head, and a
  head block that still carries a hash is evicted (a ``BlockRemoved`` event).
- Block hashes are the engine's OWN chained digests, computed like vLLM's ``sha256``
  algorithm: ``sha256(pickle((parent_digest or NONE_HASH, tuple(tokens), extra_keys)))``.
  They are deliberately not ``router.hashing.keys``: the router is tested against
  hashes it cannot reproduce, as on a real engine.
- Extra keys as vLLM builds them: the LoRA name on every block, the ``cache_salt`` on block 0.
- A lookup finds the leading cached blocks, capped at ``(prompt_tokens - 1) // block_size``
  because the engine always recomputes the last prompt token.
- Full blocks are registered (cached) when scheduled, prompt and generated alike; a
  block whose hash is already cached stays anonymous (no duplicate events).
- Finishing a request frees its blocks tail first, so the deepest blocks are evicted first.

It owns blocks, hashes and the events they cause; it refuses to own time, slots or I/O.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

# vLLM's NONE_HASH for the sha256 variants without PYTHONHASHSEED is a fixed value;
# ours is a fixed digest too, so runs are reproducible.
NONE_HASH = hashlib.sha256(b"cache-router-sim NONE_HASH").digest()
HASH_ALGO = "sha256"

ExtraKeys = tuple[str, ...] | None


def extra_keys(block_index: int, lora_name: str | None, salt: str | None) -> ExtraKeys:
    """vLLM's per-block extra keys: LoRA name on every block, cache salt on block 0 only."""
    keys: list[str] = []
    if lora_name:
        keys.append(lora_name)
    if salt and block_index == 0:
        keys.append(salt)
    return tuple(keys) if keys else None


def block_digest(parent: bytes | None, tokens: Sequence[int], extra: ExtraKeys) -> bytes:
    """One link of the engine's chain: sha256 over the pickled (parent, tokens, extra keys)."""
    material = (parent if parent is not None else NONE_HASH, tuple(tokens), extra)
    return hashlib.sha256(pickle.dumps(material, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def chain_digests(
    token_ids: Sequence[int],
    block_size: int,
    *,
    lora_name: str | None = None,
    salt: str | None = None,
    start: int = 0,
    parent: bytes | None = None,
) -> list[bytes]:
    """Digests of the full blocks of ``token_ids`` from block ``start`` (whose parent is given)."""
    out: list[bytes] = []
    for i in range(start, len(token_ids) // block_size):
        parent = block_digest(
            parent, token_ids[i * block_size : (i + 1) * block_size], extra_keys(i, lora_name, salt)
        )
        out.append(parent)
    return out


def as_int(digest: bytes) -> int:
    """The uint64 form vLLM puts in events by default: the digest's low (last) 8 bytes."""
    return int.from_bytes(digest[-8:], "big")


def max_hit_blocks(prompt_tokens: int, block_size: int) -> int:
    """The engine recomputes the last prompt token, so at most this many blocks can hit."""
    return max(prompt_tokens - 1, 0) // block_size


@dataclass(slots=True)
class Stored:
    """BlockStored: a run of newly cached blocks continuing from ``parent``."""

    digests: list[bytes]
    parent: bytes | None
    token_ids: list[int]
    lora_name: str | None
    salt: str | None  # set only when the run starts at block 0 of a salted sequence


@dataclass(slots=True)
class Removed:
    digest: bytes


@dataclass(slots=True)
class Cleared:
    pass


CacheEvent = Stored | Removed | Cleared


@dataclass(slots=True)
class Block:
    block_id: int
    ref_cnt: int = 0
    digest: bytes | None = None
    parent: bytes | None = None
    token_ids: tuple[int, ...] = ()
    lora_name: str | None = None


@dataclass(slots=True)
class CachedBlock:
    """What a test reads of the engine's cache: one hashed block."""

    digest: bytes
    parent: bytes | None
    token_ids: tuple[int, ...]
    lora_name: str | None
    ref_cnt: int


class PrefixCache:
    """The block pool of one engine. Not thread-safe: one event loop owns it."""

    def __init__(self, num_blocks: int, block_size: int = 16) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self.events: list[CacheEvent] = []

    # --- reading -------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """vLLM's kv_cache_usage_perc: the share of blocks running requests hold."""
        return 1.0 - len(self._free) / self.num_blocks

    def __len__(self) -> int:
        return len(self._cached)

    def __contains__(self, digest: object) -> bool:
        return digest in self._cached

    def lookup(self, digests: Sequence[bytes], prompt_tokens: int) -> int:
        """Leading blocks of ``digests`` that are cached, capped as the engine caps them."""
        limit = min(len(digests), max_hit_blocks(prompt_tokens, self.block_size))
        n = 0
        while n < limit and digests[n] in self._cached:
            n += 1
        return n

    def free_after_touch(self, digests: Sequence[bytes]) -> int:
        """Free blocks left once ``digests`` (cached hits) are referenced by a request."""
        return len(self._free) - sum(1 for d in digests if self._blocks[self._cached[d]].ref_cnt == 0)

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_cnt

    def digest_of(self, block_id: int) -> bytes | None:
        return self._blocks[block_id].digest

    def contents(self) -> dict[bytes, CachedBlock]:
        out = {}
        for d, i in self._cached.items():
            b = self._blocks[i]
            out[d] = CachedBlock(d, b.parent, b.token_ids, b.lora_name, b.ref_cnt)
        return out

    # --- changing ------------------------------------------------------------------
    def touch(self, digests: Sequence[bytes]) -> list[int]:
        """Reference cached blocks (prefix hits); a free one leaves the free queue."""
        ids = []
        for d in digests:
            block = self._blocks[self._cached[d]]
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1
            ids.append(block.block_id)
        return ids

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the free queue's head, evicting the cached ones among them."""
        if n > len(self._free):
            raise MemoryError(f"need {n} blocks, {len(self._free)} free")
        ids = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self._blocks[block_id]
            if block.digest is not None:
                del self._cached[block.digest]
                self.events.append(Removed(block.digest))
                block.digest, block.parent, block.token_ids, block.lora_name = None, None, (), None
            block.ref_cnt = 1
            ids.append(block_id)
        return ids

    def commit(
        self,
        block_id: int,
        digest: bytes,
        parent: bytes | None,
        token_ids: Sequence[int],
        lora_name: str | None,
        salt: str | None,
    ) -> None:
        """Register a block that just became full; a hash already cached keeps the block anonymous."""
        if digest in self._cached:
            return
        block = self._blocks[block_id]
        block.digest, block.parent, block.token_ids, block.lora_name = (
            digest,
            parent,
            tuple(token_ids),
            lora_name,
        )
        self._cached[digest] = block_id
        last = self.events[-1] if self.events else None
        if isinstance(last, Stored) and last.digests[-1] == parent and last.lora_name == lora_name:
            last.digests.append(digest)
            last.token_ids.extend(token_ids)
        else:
            self.events.append(
                Stored([digest], parent, list(token_ids), lora_name, salt if parent is None else None)
            )

    def release(self, block_ids: Sequence[int]) -> None:
        """A request let go of its blocks: tail first, so the deepest are evicted first."""
        for block_id in reversed(block_ids):
            block = self._blocks[block_id]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None

    def reset(self) -> bool:
        """Drop every hash, as POST /reset_prefix_cache does; refused while requests hold blocks."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self._blocks:
            block.digest, block.parent, block.token_ids, block.lora_name = None, None, (), None
        self._cached.clear()
        return True

    def take_events(self) -> list[CacheEvent]:
        events, self.events = self.events, []
        return events


@dataclass(eq=False)
class SeqBlocks:
    """One request's blocks: the prompt, then generated tokens as they are computed."""

    cache: PrefixCache
    tokens: list[int]
    prompt_len: int
    lora_name: str | None = None
    salt: str | None = None
    digests: list[bytes] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    committed: int = 0  # leading blocks already in the cache (hits, then blocks this request filled)

    def blocks_needed(self, max_tokens: int) -> int:
        """Blocks this request holds at its longest (the last sampled token is never computed)."""
        bs = self.cache.block_size
        return -(-(self.prompt_len + max_tokens - 1) // bs)

    def schedule_prefill(self, hits: int) -> None:
        """Reference the ``hits`` leading cached blocks, allocate the rest of the prompt, cache full ones."""
        bs = self.cache.block_size
        self.committed = hits
        self.block_ids = self.cache.touch(self.digests[:hits])
        self.block_ids += self.cache.allocate(-(-self.prompt_len // bs) - hits)
        self._cache_full(self.prompt_len)

    def schedule_decode(self) -> None:
        """Compute the last sampled token: a slot for it, and cache the block it fills."""
        computed = len(self.tokens)
        bs = self.cache.block_size
        if computed > len(self.block_ids) * bs:
            self.block_ids += self.cache.allocate(1)
        if computed // bs > self.committed:  # a block just filled (most steps fill none)
            self._cache_full(computed)

    def release(self) -> None:
        ids, self.block_ids = self.block_ids, []
        self.cache.release(ids)

    def _cache_full(self, computed: int) -> None:
        bs = self.cache.block_size
        full = computed // bs
        if len(self.digests) < full:
            parent = self.digests[-1] if self.digests else None
            self.digests += chain_digests(
                self.tokens[: full * bs],
                bs,
                lora_name=self.lora_name,
                salt=self.salt,
                start=len(self.digests),
                parent=parent,
            )
        for i in range(self.committed, min(full, len(self.block_ids))):
            parent = self.digests[i - 1] if i else None
            self.cache.commit(
                self.block_ids[i],
                self.digests[i],
                parent,
                self.tokens[i * bs : (i + 1) * bs],
                self.lora_name,
                self.salt,
            )
        self.committed = max(self.committed, full)
