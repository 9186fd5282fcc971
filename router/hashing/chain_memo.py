"""Block keys of long texts without re-tokenizing or re-hashing the prefix they share.

A prompt is cut into the segment cache's content-defined chunks (``segments.cut_points``).
Walking them left to right, the key chain has a *state*: the last full block's key and the
token ids of the partial block after it. The state after a chunk depends only on the state
before it and the chunk's text, so ``(state, chunk) -> (tokens in the chunk, keys it completes,
next state)`` can be remembered. A system prompt or document seen before then costs one
dictionary probe per chunk; only the tail no earlier prompt had is tokenized and hashed.
Keying on the state (whose first link is seeded by model, adapter and salt) keeps another
model, salt or block size from ever reusing an entry.

The result is the same as ``prompt_keys(tokenizer.encode(text), ...)`` by construction (each
chunk's ids come from the same piecewise encoding, which ``segments.piecewise_is_exact``
proved equal to encoding the whole); a property test checks it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

from router.hashing.keys import chain_keys
from router.hashing.segments import SegmentCache, cut_points
from router.types import BlockKey

_State = tuple[int, tuple[int, ...]]
"""(key of the last full block, or the first-link seed before any; the token ids after it,
fewer than a block)."""
_Step = tuple[int, tuple[BlockKey, ...], _State]
"""(tokens in the chunk, keys it completes, the state after it).

Plain tuples of ints, not NamedTuples: the garbage collector stops tracking an exact tuple
that holds only untracked objects, so a full memo adds nothing to a full collection's pause
(NamedTuple instances stay tracked: 16k entries were ~5 objects each to scan)."""


class Encoded(NamedTuple):
    tokens: int
    keys: list[BlockKey]


class OverBudget(Exception):
    """More than the allowed characters are not memoized yet: tokenize them off the event loop."""


class ChainMemo:
    """LRU of (block size, chain state, chunk text) -> step, bounded by entries (~one chunk of text each)."""

    def __init__(self, segments: SegmentCache, *, max_entries: int = 16384, fine_chars: int = 64) -> None:
        self._segments = segments
        self.fine_chars = min(fine_chars, segments.chunk_chars)
        self.max_entries = max_entries
        self._lru: OrderedDict[tuple[int, _State, str], _Step] = OrderedDict()
        self._lock = threading.Lock()  # long prompts are encoded in worker threads
        self.hits = 0
        self.misses = 0

    def encode(self, text: str, head: Sequence[int], tail: Sequence[int], block_size: int,
               seed: BlockKey, *, budget_chars: int | None = None) -> Encoded:
        """Token count and full-block keys of ``head + ids(text) + tail``, chained from ``seed``.

        ``budget_chars``: raise ``OverBudget`` instead of tokenizing when more than this many
        characters past the memoized prefix would need the tokenizer (a long new document is
        then encoded in a worker thread; a long prompt whose prefix is known stays inline).
        """
        state: _State = (int(seed), tuple(head))
        tokens = len(head)
        keys: list[BlockKey] = []
        prev = 0
        # Whole chunks, then the rest cut again at ``fine_chars``: the prefix a prompt shares
        # with earlier ones usually ends inside its last chunk, and tokenizing costs ~0.3 µs a
        # character, so the shared part of that chunk is taken from the memo too.
        cuts = cut_points(text, self._segments.chunk_chars)
        if self.fine_chars < self._segments.chunk_chars:
            rest = cuts[-1] if cuts else 0
            cuts += [rest + c for c in cut_points(text[rest:], self.fine_chars)]
        for cut in cuts:
            n, new_keys, state = self._step(block_size, state, text[prev:cut], budget_chars is not None and
                                            len(text) - prev > budget_chars)
            tokens += n
            keys += new_keys
            prev = cut
        # The last piece runs to the end of this text: no later prompt shares it as a whole,
        # so it is hashed without a memo entry (its ids still go through the segment cache).
        if budget_chars is not None and len(text) - prev > budget_chars:
            raise OverBudget
        last = self._segments.encode_chunk(text[prev:]) if prev < len(text) else ()
        parent, pending = state
        ids = [*pending, *last, *tail]
        tokens += len(last) + len(tail)
        keys += chain_keys(ids, block_size, BlockKey(parent))
        return Encoded(tokens, keys)

    def _step(self, block_size: int, state: _State, chunk: str, over_budget: bool = False) -> _Step:
        key = (block_size, state, chunk)
        with self._lock:
            step = self._lru.get(key)
            if step is not None:
                self._lru.move_to_end(key)
                self.hits += 1
                return step
            if over_budget:
                raise OverBudget
            self.misses += 1
        ids = self._segments.encode_chunk(chunk)
        parent, pending = state
        run = [*pending, *ids]
        full = len(run) // block_size * block_size
        new_keys = tuple(chain_keys(run[:full], block_size, BlockKey(parent)))
        after: _State = (int(new_keys[-1]) if new_keys else parent, tuple(run[full:]))
        step: _Step = (len(ids), new_keys, after)
        with self._lock:
            self._lru[key] = step
            if len(self._lru) > self.max_entries:
                self._lru.popitem(last=False)
        return step
