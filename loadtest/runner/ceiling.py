"""The ceiling: the hit rate one unlimited prefix cache would reach on the requests actually sent.

Offline, from the token ids of each prompt in send order: a request hits its leading
blocks that any earlier request already had (its prompt, or its prompt plus the reply,
since engines cache the blocks generated tokens fill), capped as vLLM caps it, at
``(n - 1) // block_size`` blocks because the last prompt token is always recomputed.
No router over any number of engines can beat it; a single engine with room for the
working set reaches it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from router.hashing.keys import cacheable_blocks, prompt_keys


@dataclass(frozen=True)
class SentPrompt:
    """One request's prompt ids, and the ids its engine could have cached after it (prompt + reply)."""

    prompt_ids: Sequence[int]
    cached_after: Sequence[int] | None = None


@dataclass(frozen=True)
class Ceiling:
    hit_tokens: int
    prompt_tokens: int
    block_size: int

    @property
    def rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def ceiling(prompts: Iterable[SentPrompt], block_size: int, namespace: str = "ceiling") -> Ceiling:
    """Replay ``prompts`` in order through an unlimited cache of ``block_size``-token blocks."""
    seen: set[int] = set()
    hits = total = 0
    for sent in prompts:
        n = len(sent.prompt_ids)
        keys = prompt_keys(sent.prompt_ids, block_size, namespace)
        matched = 0
        for key in keys:
            if key not in seen:
                break
            matched += 1
        hits += min(matched, cacheable_blocks(n, block_size)) * block_size
        total += n
        seen.update(keys)
        if sent.cached_after is not None:
            seen.update(prompt_keys(sent.cached_after, block_size, namespace))
    return Ceiling(hits, total, block_size)
