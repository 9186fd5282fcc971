"""A request's prompt -> token ids -> chained block keys, as the engine will see them.

Owns: which tokenizer serves which model (``config.models[m].tokenizer``, else the
top-level ``tokenizer``), the approximate character mode when there is none, keeping
long prompts off the event loop (repeated segments such as a shared system prompt are
cached by the tokenizer itself: ``router.hashing.segments``). It refuses to own the
hashing itself (``router.hashing``) or any I/O.

Approximate mode: without a tokenizer the router hashes Unicode code points in blocks of
``block_size * CHARS_PER_TOKEN`` characters. Matching still works (same text, same keys),
but token counts are estimates, so stale-hit correction is off for those requests; the
``cache_router_tokenizer_approximate`` gauge, the logs and ``/debug/route`` say so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from router.config import RouterConfig
from router.errors import BadRequest, TemplateRejected
from router.hashing.chain_memo import OverBudget
from router.hashing.keys import MAX_TOKEN_ID, cacheable_blocks, first_link_seed, prompt_keys
from router.hashing.tokenizer import ModelTokenizer, TemplateError
from router.metrics import STAGE_SECONDS, TOKENIZER_APPROXIMATE
from router.request.model import RoutingRequest
from router.types import BlockKey

log = logging.getLogger("cache_router.request")

CHARS_PER_TOKEN = 4
"""English BPE averages about 4 characters per token; only used in approximate mode."""
THREAD_THRESHOLD_CHARS = 32_768
"""Above this (~8k tokens) a prompt is tokenized in a worker thread. Below it, inline is
cheaper: repeated chunks hit the tokenizer's segment cache (router.hashing.segments), whose
Python part holds the GIL, so a thread adds a hand-off and can stall the event loop for a
GIL switch interval (5 ms). Uncached, the sim tokenizer takes ~0.3 µs per character, so the
longest inline call is ~10 ms; measured here with a threshold of 8k characters, the thread
hand-offs were among the top costs in a profile of 2k-token requests. Applies where the
tokenizer cannot be used piecewise; otherwise ``INLINE_NEW_CHARS`` decides."""
INLINE_NEW_CHARS = 8_192
"""With the chain memo, what costs is only the text no earlier prompt had: up to this many
new characters (~2.5 ms of tokenizing at worst) are encoded inline, more go to a worker
thread. An 8k-token prompt with a known prefix took 480 µs through the thread (2.2 ms at
32k tokens) and takes ~0.1 ms inline."""

_render_s = STAGE_SECONDS.labels("render")
_tokenize_s = STAGE_SECONDS.labels("tokenize")
_hash_s = STAGE_SECONDS.labels("hash")


@dataclass(frozen=True, slots=True)
class EncodedPrompt:
    keys: list[BlockKey]
    prompt_tokens: int
    """Token count (estimated in approximate mode)."""
    block_size: int
    """Tokens per block, as the engine counts them."""
    cacheable_blocks: int
    approximate: bool


class PromptEncoder:
    """Tokenizers per model, loaded once at start (a missing directory is a start-up error)."""

    def __init__(self, config: RouterConfig) -> None:
        self._by_dir: dict[str, ModelTokenizer] = {}
        self._flagged: set[str] = set()
        self._default = self._load(config.tokenizer)
        self._per_model: dict[str, ModelTokenizer | None] = {
            name: self._load(m.tokenizer) for name, m in config.models.items() if m.tokenizer is not None
        }
        if self._default is None:
            log.warning("no tokenizer configured: approximate character mode (keys over characters, "
                        "token counts estimated, stale-hit correction off)")

    def _load(self, directory: str | None) -> ModelTokenizer | None:
        if directory is None:
            return None
        path = str(Path(directory).expanduser().resolve())
        if path not in self._by_dir:
            self._by_dir[path] = ModelTokenizer.from_dir(path)
        return self._by_dir[path]

    def tokenizer(self, model: str) -> ModelTokenizer | None:
        return self._per_model.get(model, self._default)

    async def encode(self, req: RoutingRequest, block_size: int) -> EncodedPrompt:
        tok = self.tokenizer(req.model)
        if req.model not in self._flagged:
            self._flagged.add(req.model)
            TOKENIZER_APPROXIMATE.labels(req.model).set(0 if tok is not None else 1)
        if req.prompt_ids is not None:
            limit = tok.vocab_size if tok is not None else MAX_TOKEN_ID + 1
            if max(req.prompt_ids) >= limit:
                raise BadRequest(f"token ids must be below the vocabulary size {limit}", param="prompt")
            ids = _truncated(req, req.prompt_ids)
            return self._keys(req, ids, block_size, len(ids), approximate=False)
        if tok is None:
            return self._approximate(req, block_size)
        text, special = self._render(req, tok)
        # Stages are timed here, on the event loop, also around a worker thread's share (its
        # hand-off is part of what the request waits): metrics are written by this thread only
        # (router.metrics.LoopValue).
        t0 = time.perf_counter()
        if req.truncate_prompt_tokens is None and tok.segment_cache is not None:
            try:
                # Inline while the new text is short: a long prompt whose prefix is known
                # costs a memo walk (8k tokens: ~0.1 ms), less than a thread hand-off.
                fast = self._memo_keys(req, tok, text, special, block_size, budget_chars=INLINE_NEW_CHARS)
            except OverBudget:
                fast = await asyncio.to_thread(self._memo_keys, req, tok, text, special, block_size)
            if fast is not None:
                _tokenize_s.observe(time.perf_counter() - t0)
                return fast
        if len(text) > THREAD_THRESHOLD_CHARS:
            ids = await asyncio.to_thread(self._tokenize, tok, text, special)
        else:
            ids = self._tokenize(tok, text, special)
        _tokenize_s.observe(time.perf_counter() - t0)
        ids = _truncated(req, ids)
        return self._keys(req, ids, block_size, len(ids), approximate=False)

    def _render(self, req: RoutingRequest, tok: ModelTokenizer) -> tuple[str, bool]:
        """(text, add special tokens): chat is rendered by the template, which writes its own BOS."""
        if req.messages is None:
            assert req.prompt_text is not None
            return req.prompt_text, req.add_special_tokens is not False
        t0 = time.perf_counter()
        try:
            text = tok.render_chat(req.messages, **req.chat_options)
        except TemplateError as exc:
            raise TemplateRejected(str(exc), param="messages") from None
        _render_s.observe(time.perf_counter() - t0)
        return text, bool(req.add_special_tokens)

    @staticmethod
    def _memo_keys(req: RoutingRequest, tok: ModelTokenizer, text: str, special: bool,
                   block_size: int, budget_chars: int | None = None) -> EncodedPrompt | None:
        """Tokens and keys in one pass that skips the prefix earlier prompts shared (the
        tokenize stage; hashing is inside it). None if the tokenizer cannot be used piecewise."""
        out = tok.encode_keys(text, add_special_tokens=special, block_size=block_size,
                              seed=first_link_seed(req.model, req.cache_salt), budget_chars=budget_chars)
        if out is None:
            return None
        return EncodedPrompt(keys=out.keys, prompt_tokens=out.tokens, block_size=block_size,
                             cacheable_blocks=min(len(out.keys), cacheable_blocks(out.tokens, block_size)),
                             approximate=False)

    @staticmethod
    def _tokenize(tok: ModelTokenizer, text: str, special: bool) -> array[int]:
        return array("I", tok.encode(text, add_special_tokens=special))

    def _keys(self, req: RoutingRequest, ids: Sequence[int], block_size: int, n_tokens: int,
              *, approximate: bool, key_block: int | None = None) -> EncodedPrompt:
        t0 = time.perf_counter()
        kb = key_block or block_size
        keys = prompt_keys(ids, kb, req.model, req.cache_salt)
        _hash_s.observe(time.perf_counter() - t0)
        return EncodedPrompt(keys=keys, prompt_tokens=n_tokens, block_size=block_size,
                             cacheable_blocks=min(len(keys), cacheable_blocks(len(ids), kb)),
                             approximate=approximate)

    def _approximate(self, req: RoutingRequest, block_size: int) -> EncodedPrompt:
        if req.messages is not None:
            # No template: role and content joined, enough for equal conversations to share keys.
            text = "".join(f"{m.get('role')}\n{_content_text(m.get('content'))}\n" for m in req.messages)
        else:
            assert req.prompt_text is not None
            text = req.prompt_text
        points = array("I", text.encode("utf-32-le", "surrogatepass"))  # code points, without a Python-level loop
        n_tokens = max(1, -(-len(points) // CHARS_PER_TOKEN))
        return self._keys(req, points, block_size, n_tokens, approximate=True,
                          key_block=block_size * CHARS_PER_TOKEN)


def _truncated(req: RoutingRequest, ids: Sequence[int]) -> Sequence[int]:
    k = req.truncate_prompt_tokens
    return ids[-k:] if k is not None and len(ids) > k else ids


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""
