"""Block keys of long texts without re-tokenizing or re-hashing the prefix they share.

A prompt is cut into the segment cache's content-defined chunks (``segments.cut_points``).
Walking them left to right, the key chain has a *state*: the last full block's key and the
token ids of the partial block after it. The state at a cut depends only on the text before
it (and the chain's seed, the special tokens before the text and the block size), so the
memo remembers, per cut of every prompt it walked, ``digest of (namespace, text up to the
cut) -> (tokens so far, keys so far, state)``. A new prompt finds the longest of its cuts
the memo holds (its last cut first, then a binary search: a prompt's cuts are stored together,
so those held usually form a leading run; an eviction inside it only shortens the prefix
found), takes everything up to there in one probe, and tokenizes and hashes
only what follows. A system prompt or document seen before then costs a few hash passes
over its bytes (~1 µs per 8 KB) instead of a step per chunk.

Digests are 128-bit xxh3 over the text's bytes, seeded by the namespace: a false match would
need a collision of 128-bit hashes. An entry's keys are pieces of other entries' key tuples,
never copies, so a prompt costs memory for the keys it adds, not for the prefix it shares.

The result is the same as ``prompt_keys(tokenizer.encode(text), ...)`` by construction (each
cut's ids come from the same piecewise encoding, which ``segments.piecewise_is_exact``
proved equal to encoding the whole); a property test checks it.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import xxhash

from router.hashing.keys import chain_keys
from router.hashing.segments import SegmentCache, cut_points
from router.types import BlockKey

_State = tuple[int, tuple[int, ...]]
"""(key of the last full block, or the first-link seed before any; the token ids after it,
fewer than a block)."""
_Pieces = tuple[tuple[tuple[int, ...], int], ...]
"""A key list as pieces without copies: the first ``count`` keys of each tuple, in order."""
_Entry = tuple[int, _State, _Pieces]
"""(tokens up to the cut, the state there, the keys up to the cut).

A prompt that extends a held prefix refers to that prefix's keys and adds a tuple of its own
new keys, so a thousand prompts sharing a 32k-token document with their own tails hold the
document's 2,000 keys once. Plain tuples of ints: the garbage collector stops tracking an
exact tuple that holds only untracked objects, so a full memo adds nothing to a full
collection's pause."""
_MAX_PIECES = 8
"""A key list of more pieces (a long conversation, turn after turn) is stored flat."""

_digest = xxhash.xxh3_128_intdigest
_Stream = xxhash.xxh3_128


class Encoded(NamedTuple):
    tokens: int
    keys: list[BlockKey]


class OverBudget(Exception):
    """More than the allowed characters are not memoized yet: tokenize them off the event loop."""


class ChainMemo:
    """LRU of (namespace, text up to a cut) digests -> the chain there, bounded by entries (one per cut)."""

    def __init__(self, segments: SegmentCache, *, max_entries: int = 16384, fine_chars: int = 64) -> None:
        self._segments = segments
        self.fine_chars = min(fine_chars, segments.chunk_chars)
        self.max_entries = max_entries
        self._lru: OrderedDict[int, _Entry] = OrderedDict()
        self._lock = threading.Lock()  # long prompts are encoded in worker threads
        self._namespaces: dict[tuple[int, int, tuple[int, ...]], int] = {}
        self.hits = 0
        """Cuts taken from the memo."""
        self.misses = 0
        """Cuts tokenized and hashed."""

    def encode(self, text: str, head: Sequence[int], tail: Sequence[int], block_size: int,
               seed: BlockKey, *, budget_chars: int | None = None) -> Encoded:
        """Token count and full-block keys of ``head + ids(text) + tail``, chained from ``seed``.

        ``budget_chars``: raise ``OverBudget`` instead of tokenizing when more than this many
        characters past the memoized prefix would need the tokenizer (a long new document is
        then encoded in a worker thread; a long prompt whose prefix is known stays inline).
        """
        # Whole chunks, then the rest cut again at ``fine_chars``: the prefix a prompt shares
        # with earlier ones usually ends inside its last chunk, and tokenizing costs ~0.3 µs a
        # character, so the shared part of that chunk is taken from the memo too.
        cuts = cut_points(text, self._segments.chunk_chars)
        if self.fine_chars < self._segments.chunk_chars:
            rest = cuts[-1] if cuts else 0
            cuts += [rest + c for c in cut_points(text[rest:], self.fine_chars)]
        ns = self._namespace(block_size, seed, head)
        if text.isascii():
            raw = memoryview(text.encode("ascii"))
            ends = cuts
        else:  # the cuts' byte offsets
            raw = memoryview(text.encode("utf-8", "surrogatepass"))
            ends, at, prev = [], 0, 0
            for cut in cuts:
                at += len(text[prev:cut].encode("utf-8", "surrogatepass"))
                ends.append(at)
                prev = cut
        found, entry = self._longest(ns, raw, ends)
        keys: list[BlockKey] = []
        if entry is not None:
            tokens, state, pieces = entry
            for part, count in pieces:
                keys += part[:count] if count < len(part) else part  # type: ignore[arg-type]
            prev = cuts[found]
        else:
            state, pieces = (int(seed), tuple(head)), ()
            tokens, prev = len(head), 0
        held = len(keys)
        if budget_chars is not None and len(text) - prev > budget_chars:
            raise OverBudget
        encode_chunk = self._segments.encode_chunk
        new: list[tuple[int, int, _State]] = []  # (tokens, keys, state) at each cut past ``found``
        parent, pending = state
        for cut in cuts[found + 1:]:
            ids = encode_chunk(text[prev:cut])
            run = [*pending, *ids]
            full = len(run) // block_size * block_size
            if full:
                more = chain_keys(run[:full], block_size, BlockKey(parent))
                keys += more
                parent = int(more[-1])
            pending = tuple(run[full:])
            tokens += len(ids)
            new.append((tokens, len(keys), (parent, pending)))
            prev = cut
        if new:
            added = tuple(keys[held:])
            self._store(ns, raw, ends, found, new, pieces, added, tuple(keys) if len(pieces) >= _MAX_PIECES else None)
        # The last piece runs to the end of this text: no later prompt shares it as a whole,
        # so it is hashed without a memo entry (its ids still go through the segment cache).
        last = encode_chunk(text[prev:]) if prev < len(text) else ()
        tokens += len(last) + len(tail)
        keys += chain_keys([*pending, *last, *tail], block_size, BlockKey(parent))
        return Encoded(tokens, keys)

    def _longest(self, ns: int, raw: memoryview, ends: list[int]) -> tuple[int, _Entry | None]:
        """(index of the longest cut the memo holds, its entry), or (-1, None)."""
        if not ends:
            return -1, None
        lru = self._lru
        with self._lock:
            found = len(ends) - 1
            digest = _digest(raw[: ends[found]], ns)
            entry = lru.get(digest)
            if entry is None:
                # A prompt's cuts are stored together, so the cuts of this one the memo holds
                # usually form a leading run: bisect for its end. (An entry evicted inside the
                # run only makes the prefix found shorter, never wrong.)
                lo, hi = 0, found  # the longest held cut is in [lo - 1, hi - 1]
                while lo < hi:
                    mid = (lo + hi) // 2
                    d = _digest(raw[: ends[mid]], ns)
                    probe = lru.get(d)
                    if probe is None:
                        hi = mid
                    else:
                        entry, found, digest, lo = probe, mid, d, mid + 1
                if entry is None:
                    self.misses += len(ends)
                    return -1, None
            lru.move_to_end(digest)
            self.hits += found + 1
            self.misses += len(ends) - found - 1
            return found, entry

    def _store(self, ns: int, raw: memoryview, ends: list[int], found: int, new: list[tuple[int, int, _State]],
               pieces: _Pieces, added: tuple[int, ...], flat: tuple[int, ...] | None) -> None:
        """Entries for the cuts past ``found``: the held prefix's ``pieces`` and the keys
        ``added`` after it (or the ``flat`` keys when the pieces are too many)."""
        # One streaming pass gives the digest at every new cut (equal to hashing each prefix).
        stream = _Stream(seed=ns)
        start = ends[found] if found >= 0 else 0
        stream.update(raw[:start])
        held = sum(count for _, count in pieces)
        with self._lock:
            lru = self._lru
            for end, (tokens, n_keys, state) in zip(ends[found + 1:], new, strict=True):
                stream.update(raw[start:end])
                start = end
                if flat is not None:
                    own: _Pieces = ((flat, n_keys),)
                elif n_keys > held:
                    own = (*pieces, (added, n_keys - held))
                else:
                    own = pieces
                lru[stream.intdigest()] = (tokens, state, own)
            while len(lru) > self.max_entries:
                lru.popitem(last=False)

    def _namespace(self, block_size: int, seed: BlockKey, head: Sequence[int]) -> int:
        """The xxh3 seed (64 bits) of everything besides the text that a chain depends on."""
        key = (block_size, int(seed), tuple(head))
        ns = self._namespaces.get(key)
        if ns is None:
            ns = xxhash.xxh3_64_intdigest(struct.pack(f"<QQ{len(head)}I", *key[:2], *head))
            if len(self._namespaces) >= 1024:  # models x salts x block sizes; a salt per user is unbounded
                self._namespaces.clear()
            self._namespaces[key] = ns
        return ns
