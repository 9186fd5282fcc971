"""Benchmark request bodies: a long shared prefix and a unique tail (``__UNIQUE__``, filled per request by wrk).

The shared prefix is what a real fleet sees (system prompts, documents); the unique tail
keeps every request distinct, so no cache of whole prompts can make a router look faster
than it is.
"""

from __future__ import annotations

import json
import random

_WORDS = (  # noqa: SIM905 - a sentence reads better than a list of 110 strings
    "the of and a to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up other "
    "about out many then them these so some her would make like him into time has look two more write go see "
    "number no way could people my than first been call who oil its now find long down day did get come made "
    "may part cache router block token engine replica prefix request stream latency"
).split()

# About 1.08 tokens per word with the project's tokenizer (measured); the tail adds ~20.
_TOKENS_PER_WORD = 1.08


def _words(n_tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, int(n_tokens / _TOKENS_PER_WORD))))


def _options(max_tokens: int, stream: bool) -> dict[str, object]:
    opts: dict[str, object] = {"max_tokens": max_tokens, "temperature": 0}
    if stream:
        opts["stream"] = True
    return opts


def completion_body(n_tokens: int, *, model: str = "sim-model", max_tokens: int = 1, stream: bool = False) -> str:
    prompt = _words(n_tokens - 20, seed=n_tokens) + " request __UNIQUE__ please answer briefly"
    return json.dumps({"model": model, "prompt": prompt, **_options(max_tokens, stream)})


def chat_body(n_tokens: int, *, model: str = "sim-model", max_tokens: int = 1, stream: bool = False) -> str:
    messages = [
        {"role": "system", "content": _words(n_tokens - 40, seed=n_tokens)},
        {"role": "user", "content": "question __UNIQUE__: what does the document say about the cache?"},
    ]
    return json.dumps({"model": model, "messages": messages, **_options(max_tokens, stream)})
