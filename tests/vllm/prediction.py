"""The router's prediction of an engine's cached tokens, computed with the router's own code.

Mirrors what the router does in approximate mode: tokenize (``ModelTokenizer``), hash
full blocks into chained keys (``prompt_keys``), look the keys up in the index, cap at
``cacheable_blocks``, then record the prompt's keys for the replica it was sent to.
Also builds test prompts of exact token lengths from words the tokenizer keeps whole.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.hashing.keys import cacheable_blocks, prompt_keys
from router.hashing.tokenizer import ModelTokenizer
from router.index.base import BlockIndex
from router.index.memory import MemoryBlockIndex
from router.types import BackendId


class KeyPredictor:
    """Predicted matched tokens per prompt, for one replica.

    By default from its own approximate-mode index (``record`` after each send); in the
    events tests from the index that the router's KV-event ingest keeps (never ``record``).
    """

    def __init__(
        self, block_size: int, namespace: str, replica: BackendId, index: BlockIndex | None = None
    ) -> None:
        self.block_size = block_size
        self.namespace = namespace
        self.replica = replica
        self.index: BlockIndex = index if index is not None else MemoryBlockIndex()

    async def predict(self, token_ids: Sequence[int], salt: str | None = None) -> int:
        """Matched tokens the router predicts for this prompt; does not record it."""
        keys = prompt_keys(token_ids, self.block_size, self.namespace, salt)
        held = (await self.index.lookup(keys)).get(self.replica, 0)
        return min(held, cacheable_blocks(len(token_ids), self.block_size)) * self.block_size

    async def record(self, token_ids: Sequence[int], salt: str | None = None) -> None:
        """After dispatch: the replica now holds every full block of the prompt (as the router assumes)."""
        keys = prompt_keys(token_ids, self.block_size, self.namespace, salt)
        await self.index.record(self.replica, keys, ttl_s=None)

    async def predict_and_record(self, token_ids: Sequence[int], salt: str | None = None) -> int:
        predicted = await self.predict(token_ids, salt)
        await self.record(token_ids, salt)
        return predicted

    async def forget(self) -> None:
        """The engine's cache was reset: so is the router's picture of it."""
        await self.index.clear(self.replica)


class Words:
    """Seeded random words that each encode to exactly one token after a space.

    With a byte-level BPE whose pre-tokenizer splits on spaces, ``" " + word`` of such a
    word is one token wherever it stands, so a text of n words is n tokens (plus BOS for
    a completion). That makes prompts of exact lengths around block boundaries easy.
    """

    def __init__(self, tokenizer: ModelTokenizer, seed: int) -> None:
        vocab = tokenizer._tok.get_vocab()
        candidates = sorted(
            tok[1:] for tok in vocab if tok.startswith("\u0120") and tok[1:].isalpha() and tok[1:].isascii()
        )
        self.words = [w for w in candidates if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]
        if len(self.words) < 200:
            raise RuntimeError(f"only {len(self.words)} single-token words in this vocabulary")
        self.rng = random.Random(seed)

    def text(self, n_tokens: int) -> str:
        """A text of exactly ``n_tokens`` tokens (no BOS), starting with a space."""
        return "".join(" " + self.rng.choice(self.words) for _ in range(n_tokens))
