"""Tokenize long texts piecewise, caching the pieces: a shared system prompt or document
seen a thousand times is tokenized once.

A text is cut at content-defined places (the first ``letter-or-digit, space, letter``
boundary after every ``chunk_chars`` characters from the previous cut), so two prompts
that share a prefix share their leading chunks and their cache entries. Tokenizing the
chunks separately gives the same ids as tokenizing the whole only if the tokenizer never
merges across such a boundary; that holds for byte-level BPE pre-tokenizers (GPT-2, Llama 3
style) and fails for SentencePiece-style ones that prepend a space marker to each piece.
``piecewise_is_exact`` checks it for a given tokenizer at load time; when it fails the
caller tokenizes whole texts (correct keys first, speed second).
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

Encode = Callable[[str], list[int]]
Short = Callable[[str], "list[int] | None"]


def cut_points(text: str, chunk_chars: int) -> list[int]:
    """Indices where ``text`` is cut: before a space between an alphanumeric and a letter."""
    cuts: list[int] = []
    start = 0
    n = len(text)
    while True:
        i = text.find(" ", start + chunk_chars)
        while i != -1 and i + 1 < n and not (text[i - 1].isalnum() and text[i + 1].isalpha()):
            i = text.find(" ", i + 1)
        if i == -1 or i + 1 >= n:
            return cuts
        cuts.append(i)
        start = i


class SegmentCache:
    """LRU of chunk text -> token ids (bounded by entries; chunks are ~chunk_chars each)."""

    def __init__(self, encode: Encode, *, chunk_chars: int = 1024, max_entries: int = 8192,
                 short: Short | None = None) -> None:
        self._encode = encode
        self._short = short
        """Ids of the texts it takes (None for others) as fast as a cache hit: those skip the
        cache (router.hashing.words; a prompt's unique tail would only evict shared chunks)."""
        self.chunk_chars = chunk_chars
        self.max_entries = max_entries
        self._lru: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()  # callers may tokenize long prompts in worker threads
        self.hits = 0
        self.misses = 0

    def encode(self, text: str) -> list[int]:
        if len(text) < 2 * self.chunk_chars:
            quick = self._short(text) if self._short is not None else None
            return quick if quick is not None else self._encode(text)
        ids: list[int] = []
        prev = 0
        for cut in [*cut_points(text, self.chunk_chars), len(text)]:
            ids.extend(self.encode_chunk(text[prev:cut]))
            prev = cut
        return ids

    def encode_chunk(self, chunk: str) -> Sequence[int]:
        """Ids of one chunk (a piece ``cut_points`` delimits), from the cache when seen before.

        Cached as a tuple: the garbage collector stops tracking a tuple of ints, where a cached
        list would be scanned by every full collection for as long as it is cached."""
        if self._short is not None:
            quick = self._short(chunk)
            if quick is not None:
                return quick
        with self._lock:
            cached = self._lru.get(chunk)
            if cached is not None:
                self._lru.move_to_end(chunk)
                self.hits += 1
                return cached
            self.misses += 1
        ids = tuple(self._encode(chunk))
        with self._lock:
            self._lru[chunk] = ids
            if len(self._lru) > self.max_entries:
                self._lru.popitem(last=False)
        return ids


def piecewise_is_exact(encode: Encode, samples: list[str], *, trials: int = 40, seed: int = 0) -> bool:
    """True if cutting at ``cut_points`` never changes the ids, on varied texts and small chunks."""
    rng = random.Random(seed)
    alphabet = ["the", "cache", "Router", "x1", "42", "año", "naïve", "I'm", "it's", "--", "!!", "a.b", "(c)",
                "\n", "\n\n", "  ", "\t", "日本", "😀", "don't", "3.14", "ok?"]
    texts = list(samples)
    for _ in range(trials):
        texts.append(" ".join(rng.choice(alphabet) for _ in range(rng.randint(5, 80))))
    for text in texts:
        whole = encode(text)
        for size in (3, 7, 16):
            cuts = [*cut_points(text, size), len(text)]
            pieces: list[int] = []
            prev = 0
            for cut in cuts:
                pieces.extend(encode(text[prev:cut]))
                prev = cut
            if pieces != whole:
                return False
    return True
