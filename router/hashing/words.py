"""Short ASCII texts tokenized word by word, skipping the tokenizer library's per-call setup.

A prompt's new text is usually short (the unique tail after a shared prefix: a question, a
request id): ~35 characters cost the Hugging Face tokenizer 10 µs alone and ~27 µs inside the
running router (normalizer, pre-tokenizer, post-processor and an ``Encoding`` built per call,
with cold caches between requests), the largest single share of a 2k-token request
(docs/overhead.md). For byte-level BPE the library's own pipeline is: split the text with the
pre-tokenizer's regex, map each piece's bytes to the byte-level alphabet, run BPE on each
piece alone. ``WordEncoder`` does the same, with the split in Python's ``re`` (the pattern's
Unicode classes rewritten for ASCII text, the only text it accepts), BPE from the library's
own model (``model.tokenize``, ~1 µs a piece) and the ids of each piece cached: ~2 µs.

It refuses to own anything the library might do differently. ``for_tokenizer`` accepts only
a BPE model without dropout, no normalizer, no truncation or padding, and a pre-tokenizer that
is ByteLevel with its regex (GPT-2) or one regex ``Split`` followed by ByteLevel (Llama 3,
Qwen 2); then it checks itself against the library on varied texts (every ASCII character,
contractions, digit runs, whitespace runs) and declines on any difference. At run time a text
that is not ASCII or is longer than ``max_chars`` gets ``None``: the caller uses the library.
Added tokens (``<s>``, a chat template's ``<|im_start|>``) are taken out first, as the library
does, and the text between them split on its own; one whose ``lstrip``, ``rstrip`` or
``single_word`` flag would make it take whitespace or context sends its text to the library.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from tokenizers import Tokenizer

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
"""ByteLevel's own split when ``use_regex`` is on."""

_ASCII_MEMBERS = {"L": "A-Za-z", "N": "0-9", "Nd": "0-9", "Lu": "A-Z", "Ll": "a-z",
                  "Lt": "", "Lm": "", "Lo": "", "M": "", "Mn": "", "Mc": "", "Me": "", "Nl": "", "No": ""}
"""The ASCII members of the Unicode classes tokenizer patterns use (``\\p{P}`` and others with
ASCII members but no simple range are not rewritten: such a pattern is declined)."""
_PROPERTY = re.compile(r"\\([pP])\{(\w+)\}")
MAX_CHARS = 512
"""Longer texts go to the library. This path is faster per character too (a 1 KB chunk: 155
against 301 µs), but it holds the GIL, and long new texts are tokenized in worker threads
while the event loop serves other requests; the library releases it."""
MAX_WORDS = 1 << 16
"""Cached pieces; the cache starts over when full (user text has unbounded variety)."""


def ascii_pattern(pattern: str) -> str | None:
    """``pattern`` (Oniguruma syntax, Unicode classes) as a Python pattern that splits ASCII
    text the same way, or None when a class cannot be rewritten."""
    out: list[str] = []
    members = -1  # characters in the class being read; -1 outside a class
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            m = _PROPERTY.match(pattern, i)
            if m is None:
                out.append(pattern[i : i + 2])
                members += members >= 0
                i += 2
                continue
            ascii_members = _ASCII_MEMBERS.get(m.group(2))
            if m.group(1) == "P" or ascii_members is None:
                return None
            if members >= 0:
                out.append(ascii_members)
                members += len(ascii_members)
            else:
                out.append(f"[{ascii_members}]" if ascii_members else "(?!)")
            i = m.end()
            continue
        if members < 0 and ch == "[":
            members = 0
            if pattern.startswith("[^", i):
                out.append("[^")
                i += 2
                continue
        elif members >= 0 and ch == "]":
            if members == 0:
                return None  # emptied by the rewrite (or a leading literal "]": declined too)
            members = -1
        elif members >= 0:
            members += 1
        out.append(ch)
        i += 1
    return "".join(out)


def _byte_alphabet() -> dict[int, str]:
    """ByteLevel's printable stand-in for each ASCII byte (GPT-2's bytes_to_unicode)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table: dict[int, str] = {}
    shifted = 0
    for b in range(256):
        if b in printable:
            char = chr(b)
        else:
            char = chr(256 + shifted)
            shifted += 1
        if b < 128:
            table[b] = char
    return table


_BYTE_ALPHABET = str.maketrans(_byte_alphabet())


def _split_pattern(config: dict[str, Any]) -> str | None:
    """The regex of a supported byte-level pre-tokenizer, else None."""
    pre = config.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            return None
        return GPT2_PATTERN
    if pre.get("type") != "Sequence":
        return None
    steps = pre.get("pretokenizers") or []
    if len(steps) != 2:
        return None
    split, level = steps
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or level.get("type") != "ByteLevel" or level.get("add_prefix_space") or level.get("use_regex")):
        return None
    regex = (split.get("pattern") or {}).get("Regex")
    return regex if isinstance(regex, str) else None


class WordEncoder:
    """Ids of short ASCII texts from regex pieces and the BPE model; see the module doc."""

    def __init__(self, tokenizer: Tokenizer, split: re.Pattern[str], added: dict[str, int | None],
                 *, max_chars: int = MAX_CHARS) -> None:
        """``added``: the added tokens' contents (ASCII ones; others cannot occur in ASCII text)
        with their id, or None for one this encoder cannot place (``lstrip``, ``rstrip`` and
        ``single_word`` take whitespace or context that only the library knows about)."""
        self._model = tokenizer.model
        self._split = split
        self._added_ids = added
        self._added = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True)))) if added else None
        self.max_chars = max_chars
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, *, max_chars: int = MAX_CHARS) -> WordEncoder | None:
        """An encoder equal to ``tokenizer.encode(text, add_special_tokens=False)`` on the
        texts it accepts, or None when this tokenizer is not one it can follow exactly."""
        if tokenizer.truncation is not None or tokenizer.padding is not None:
            return None
        config = json.loads(tokenizer.to_str())
        model = config.get("model") or {}
        if config.get("normalizer") is not None or model.get("type") != "BPE" or model.get("dropout"):
            return None
        pattern = _split_pattern(config)
        rewritten = ascii_pattern(pattern) if pattern is not None else None
        if rewritten is None:
            return None
        try:
            split = re.compile(rewritten, re.ASCII)
        except re.error:
            return None
        added: dict[str, int | None] = {}
        for t in config.get("added_tokens") or ():
            content = t.get("content")
            if isinstance(content, str) and content and content.isascii():
                plain = not (t.get("lstrip") or t.get("rstrip") or t.get("single_word"))
                added[content] = t.get("id") if plain and isinstance(t.get("id"), int) else None
        encoder = cls(tokenizer, split, added, max_chars=max_chars)
        return encoder if encoder.agrees_with(tokenizer, list(added)) else None

    def encode(self, text: str) -> list[int] | None:
        """The ids of ``text``, or None when it is not one this encoder takes (the caller asks
        the library)."""
        if len(text) > self.max_chars or not text.isascii():
            return None
        if self._added is None:
            return self._words(text)
        # The library takes added tokens out first (leftmost, longest) and splits what is
        # between them on its own: a chat template's <|im_start|> ends a piece.
        ids: list[int] = []
        at = 0
        for m in self._added.finditer(text):
            token = self._added_ids[m.group()]
            if token is None:
                return None
            ids += self._words(text[at : m.start()])
            ids.append(token)
            at = m.end()
        ids += self._words(text[at:])
        return ids

    def _words(self, text: str) -> list[int]:
        cache = self._cache
        ids: list[int] = []
        pieces = self._split.findall(text)
        if sum(map(len, pieces)) != len(text):  # text between matches is a piece too (``Isolated``)
            pieces, at = [], 0
            for m in self._split.finditer(text):
                if m.start() > at:
                    pieces.append(text[at : m.start()])
                pieces.append(m.group())
                at = m.end()
            if at < len(text):
                pieces.append(text[at:])
        for piece in pieces:
            ids += cache.get(piece) or self._piece(piece)
        return ids

    def _piece(self, piece: str) -> tuple[int, ...]:
        ids = tuple(t.id for t in self._model.tokenize(piece.translate(_BYTE_ALPHABET)))
        cache = self._cache
        if len(cache) >= MAX_WORDS:
            cache.clear()
        cache[piece] = ids
        return ids

    def agrees_with(self, tokenizer: Tokenizer, added: list[str] | None = None, *, trials: int = 400,
                    seed: int = 0) -> bool:
        """True when this encoder gives the library's ids on every sample text (the texts
        where a rewritten pattern, the byte alphabet or an added token would differ if they
        could); ``added``: the tokenizer's added tokens, mixed into the samples."""
        for text in _samples(trials, seed, added or []):
            mine = self.encode(text)
            if mine is not None and mine != tokenizer.encode(text, add_special_tokens=False).ids:
                return False
        return True


def _samples(trials: int, seed: int, added: list[str]) -> list[str]:
    rng = random.Random(seed)
    every = "".join(map(chr, range(128)))
    pieces = ["the", "Cache", "ROUTER", "x1", "42", "123456", "I'm", "it's", "DON'T", "we'll", "you've", "'d",
              "--", "!!", "a.b", "(c)", "\n", "\n\n", " \n", "\r\n", "  ", "   ", "\t", "\x0b", "\x0c", "\x1c",
              "\x7f", "\x00", "ok?", "3.14", "_id", "<tag>", "{\"k\": 1}", "'", "''", *added[:64]]
    texts = [every, every[::-1], " " + every, every + "  "]
    texts += [a + b for a in pieces for b in (" ", "", "  ", "\n")]
    for _ in range(trials):
        texts.append("".join(rng.choice(pieces) + rng.choice(("", " ", " ", "  ", "\n"))
                             for _ in range(rng.randint(1, 40))))
    return texts
