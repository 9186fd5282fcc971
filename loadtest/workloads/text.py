"""Seeded pseudo-words of a known token length, so prompts hit token targets without real text.

Words are built from syllables, so any seed gives pronounceable, distinct vocabularies.
Each word's token count (with its leading space, as it appears inside a prompt) is
measured once with the shared tokenizer; a text's length is then the sum of its words'
counts. Byte-level BPE splits at spaces, so the sum is within a token or two of what the
engine counts; the runner measures the exact figures from the engine's usage anyway.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

from router.hashing.tokenizer import ModelTokenizer

SIM_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "sim-model"
_ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "x"]
VOCAB_SIZE = 3000  # enough distinct words that two random 16-token blocks never collide by chance


@lru_cache(maxsize=4)
def load_tokenizer(path: str = str(SIM_MODEL_DIR)) -> ModelTokenizer:
    return ModelTokenizer.from_dir(path)


class WordSource:
    """Deterministic text of a target token length from one seed."""

    def __init__(self, seed: int, tokenizer: ModelTokenizer | None = None) -> None:
        self.tokenizer = tokenizer or load_tokenizer()
        self.rng = random.Random(f"words:{seed}")
        words: set[str] = set()
        vocab_rng = random.Random(f"vocab:{seed}")
        while len(words) < VOCAB_SIZE:
            n = vocab_rng.choice((1, 2, 2, 3))
            words.add("".join(vocab_rng.choice(_ONSETS) + vocab_rng.choice(_VOWELS) + vocab_rng.choice(_CODAS)
                              for _ in range(n)))
        self.words = sorted(words)
        self.lengths = [len(self.tokenizer.encode(" " + w, add_special_tokens=False)) for w in self.words]

    def text(self, n_tokens: int) -> str:
        """About ``n_tokens`` tokens of fresh words (never fewer than one word)."""
        out: list[str] = []
        total = 0
        while total < n_tokens or not out:
            i = self.rng.randrange(len(self.words))
            out.append(self.words[i])
            total += self.lengths[i]
        return " ".join(out)

    def tagged(self, tag: str, n_tokens: int) -> str:
        """Text opening with ``tag`` (e.g. "Group 7:") so distinct groups differ from the first block."""
        return f"{tag} {self.text(max(1, n_tokens - 4))}"
