"""Chained block keys over token ids.

A block key is ``xxh3_64(block's token ids as little-endian uint32, seed=parent key)``;
the first block's parent is a seed derived from the namespace (the model or LoRA
adapter name) and the cache salt, so another model, adapter or salt never shares a key.
Only full blocks get keys, as only full blocks are cached by the engine.

The same function serves the request path (keys of a prompt) and the event path
(keys of the ``token_ids`` in a BlockStored, continuing from the parent's key), which
is what makes the two agree by construction rather than by reproducing the engine's
own hash.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

from router.types import BlockKey

_xxh = xxhash.xxh3_64_intdigest
_MAX_TOKEN_ID = 2**32 - 1


def first_link_seed(namespace: str, salt: str | None = None) -> BlockKey:
    """The parent of a sequence's first block: unique per (model or adapter, salt)."""
    material = namespace.encode() + b"\x00" + (b"\x01" + salt.encode() if salt is not None else b"\x00")
    return BlockKey(_xxh(material))


def chain_keys(token_ids: Sequence[int], block_size: int, parent: BlockKey) -> list[BlockKey]:
    """Keys of every full block of ``token_ids``, chained from ``parent``.

    Token ids must be in [0, 2**32); callers validate untrusted input first
    (``array`` raises OverflowError otherwise).
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    n_blocks = len(token_ids) // block_size
    if n_blocks == 0:
        return []
    buf = memoryview(array("I", token_ids[: n_blocks * block_size]).tobytes())
    step = block_size * 4
    keys: list[BlockKey] = []
    key = int(parent)
    for start in range(0, n_blocks * step, step):
        key = _xxh(buf[start : start + step], key)
        keys.append(BlockKey(key))
    return keys


def prompt_keys(token_ids: Sequence[int], block_size: int, namespace: str, salt: str | None = None) -> list[BlockKey]:
    """Keys of a whole prompt: the chain seeded by its namespace and salt."""
    return chain_keys(token_ids, block_size, first_link_seed(namespace, salt))


def cacheable_blocks(n_prompt_tokens: int, block_size: int) -> int:
    """How many leading blocks an engine can report as cached for a prompt of this length.

    vLLM always recomputes the last prompt token to get its logits, so a fully cached
    prompt reports at most ``prompt_tokens - 1`` rounded down to whole blocks.
    """
    if n_prompt_tokens <= 0:
        return 0
    return (n_prompt_tokens - 1) // block_size


MAX_TOKEN_ID = _MAX_TOKEN_ID
