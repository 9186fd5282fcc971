"""Start-up self-check of precise mode, per replica: do the router's keys equal the engine's?

Owns one probe and its verdict. The probe is a completion of a known text (with a random
nonce in front, so its blocks are new to the engine's cache and are announced), then a chat
request of the same kind, each with ``max_tokens=1``, and a repeat of the completion:

1. the engine's ``usage.prompt_tokens`` must equal the router's token count (else the
   tokenizer, or for chat the chat template, differs);
2. the BlockStored events the probe caused must carry the router's token ids, with the
   configured block size, and chain to the router's keys (else: block size, tokenizer,
   salt or namespace: the model name the engine announces blocks under);
3. the repeat's ``cached_tokens`` must equal what the router would predict.

Any mismatch refuses precise mode for the replica (``ReplicaApplier.disable``) with an error
that names the cause; the replica stays routable in approximate mode. A replica that cannot
be probed (unreachable, no events within the deadline) is reported and left as it is: the
check proves a mismatch, it does not punish a slow engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from router.events.applier import ReplicaApplier
from router.events.decode import BlockStored
from router.hashing.keys import cacheable_blocks, prompt_keys
from router.hashing.tokenizer import ModelTokenizer
from router.index.base import BlockIndex, IndexUnavailable
from router.types import BlockKey

log = logging.getLogger(__name__)

PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog while the cache router checks that its block keys "
    "match the engine's. Seven wizards quickly jinxed the gnomes before they vaporized; pack my box "
    "with five dozen liquor jugs, and sphinx of black quartz, judge my vow."
)
"""Plain words: every tokenizer splits them, none treats them as special."""
EVENT_WAIT_S = 5.0
"""How long the probe's BlockStored may take to arrive; vLLM publishes with the next engine step."""


@dataclass(frozen=True)
class SelfCheckResult:
    ok: bool
    cause: str | None = None
    """tokenizer, template, block_size, salt, namespace, cached_tokens; or (ok=None-like) unprobed."""
    detail: str = ""
    probed: bool = True


async def check_replica(applier: ReplicaApplier, index: BlockIndex, client: httpx.AsyncClient, *,
                        load_tokenizer: Callable[[str], Awaitable[ModelTokenizer | None]],
                        block_size: Callable[[], int], wait_s: float) -> SelfCheckResult | None:
    """Wait for the replica to be healthy with a known model, probe it, act on the verdict.

    A refusal disables precise mode for the replica and clears its index entries (what its
    events wrote can never match a request's keys). None: not checked (never ready, no tokenizer).
    """
    backend = applier.backend
    deadline = time.monotonic() + wait_s
    while not (backend.healthy and backend.base_model):
        if time.monotonic() > deadline:
            log.warning("selfcheck: %s not healthy with a known model after %.0fs: not checked", backend.id, wait_s)
            return None
        await asyncio.sleep(0.2)
    model = backend.base_model
    assert model is not None
    tokenizer = await load_tokenizer(model)
    if tokenizer is None:
        return None
    result = await self_check(applier, tokenizer, client, model=model, block_size=block_size())
    if result.ok:
        log.info("selfcheck: %s: router keys equal the engine's (%s): precise mode on", backend.id, result.detail)
    elif result.probed:
        log.error("selfcheck: %s: precise mode REFUSED, cause: %s: %s", backend.id, result.cause, result.detail)
        applier.disable(f"selfcheck: {result.cause}")
        with contextlib.suppress(IndexUnavailable):
            await index.clear(backend.id)
    else:
        log.warning("selfcheck: %s could not be checked: %s", backend.id, result.detail)
    return result


async def self_check(applier: ReplicaApplier, tokenizer: ModelTokenizer, client: httpx.AsyncClient, *,
                     model: str, block_size: int, timeout_s: float = 10.0) -> SelfCheckResult:
    """Probe one replica; never raises for an engine's answer (unprobed results say why)."""
    seen: list[tuple[BlockStored, list[BlockKey]]] = []

    def observe(ev: BlockStored, keys: list[BlockKey]) -> None:
        seen.append((ev, keys))

    applier.observers.append(observe)
    try:
        return await _check(applier, tokenizer, client, seen, model=model, block_size=block_size,
                            timeout_s=timeout_s)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        return SelfCheckResult(False, None, f"could not probe: {exc!r}", probed=False)
    finally:
        applier.observers.remove(observe)


async def _check(applier: ReplicaApplier, tok: ModelTokenizer, client: httpx.AsyncClient,
                 seen: list[tuple[BlockStored, list[BlockKey]]], *, model: str, block_size: int,
                 timeout_s: float) -> SelfCheckResult:
    url = applier.backend.url
    text = _probe_text(tok, block_size)
    ids = tok.encode_completion(text)
    n_blocks = len(ids) // block_size

    # 1. token counts: tokenizer (completion), then template (chat)
    usage = await _post(client, f"{url}/v1/completions", {"model": model, "prompt": text, "max_tokens": 1,
                                                          "temperature": 0}, timeout_s)
    if usage.get("prompt_tokens") != len(ids):
        return SelfCheckResult(False, "tokenizer", f"the engine counts {usage.get('prompt_tokens')} prompt "
                               f"tokens, the router {len(ids)}: not the engine's tokenizer")

    # 2. the engine's BlockStored for the probe: block size, token ids, keys
    chain = await _wait_chain(seen, applier, ids, block_size, n_blocks)
    if applier.state.disabled == "block_size":
        return SelfCheckResult(False, "block_size", "the engine's blocks are not of the configured "
                               f"{block_size} tokens (see the block-size error above)")
    if chain is None:
        head = list(ids[:block_size])
        if any(ev.parent_block_hash is None and list(ev.token_ids[:block_size]) == head for ev, _ in seen):
            return SelfCheckResult(False, "tokenizer", "the engine stored the probe under other token ids "
                                   "after its first block")
        return SelfCheckResult(False, None, f"no BlockStored for the probe within {EVENT_WAIT_S}s "
                               "(events not arriving?)", probed=False)
    first, keys = chain
    expected = prompt_keys(ids, block_size, model, None)[: len(keys)]
    if keys != expected:
        if first.salt is not None:
            return SelfCheckResult(False, "salt", "the engine salts blocks the router does not (a default "
                                   "cache_salt on the engine or a proxy in between)")
        name = first.lora_name or applier.backend.base_model
        return SelfCheckResult(False, "namespace", f"the engine announces the blocks under model {name!r}, "
                               f"requests name {model!r}: keys differ")

    # 3. the repeat's cached tokens equal the router's prediction
    usage = await _post(client, f"{url}/v1/completions", {"model": model, "prompt": text, "max_tokens": 1,
                                                          "temperature": 0}, timeout_s)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    predicted = min(n_blocks, cacheable_blocks(len(ids), block_size)) * block_size
    if cached is None:
        log.warning("selfcheck: %s reports no cached_tokens (vLLM needs --enable-prompt-tokens-details): "
                    "stale-hit correction is blind for it", url)
    elif cached != predicted:
        return SelfCheckResult(False, "cached_tokens", f"the engine reports {cached} cached tokens for a "
                               f"repeat, the router predicts {predicted}")

    # 4. the chat template: the engine must count the same tokens for a rendered conversation
    if tok.chat_template is not None:
        messages = [{"role": "user", "content": _probe_text(tok, block_size)}]
        chat_ids = tok.encode_chat(messages)
        usage = await _post(client, f"{url}/v1/chat/completions",
                            {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0}, timeout_s)
        if usage.get("prompt_tokens") != len(chat_ids):
            return SelfCheckResult(False, "template", f"the engine counts {usage.get('prompt_tokens')} prompt "
                                   f"tokens for a chat, the router {len(chat_ids)}: another chat template")
    return SelfCheckResult(True, detail=f"{len(keys)} blocks matched")


def _probe_text(tok: ModelTokenizer, block_size: int) -> str:
    """A nonce, then the known text repeated until it spans at least three blocks and a bit."""
    nonce = " ".join(secrets.token_hex(3) for _ in range(4))
    text = f"probe {nonce}. {PROBE_TEXT}"
    while len(tok.encode_completion(text)) < 3 * block_size + 2:
        text += " " + PROBE_TEXT
    return text


async def _wait_chain(seen: list[tuple[BlockStored, list[BlockKey]]], applier: ReplicaApplier, ids: Sequence[int],
                      block_size: int, n_blocks: int) -> tuple[BlockStored, list[BlockKey]] | None:
    """The probe's chain from what the applier saw: (its first event, the keys of its blocks)."""
    deadline = time.monotonic() + EVENT_WAIT_S
    while True:
        found = _chain(seen, ids, block_size, n_blocks)
        if found is not None and len(found[1]) >= n_blocks:
            return found
        if time.monotonic() > deadline or applier.state.disabled == "block_size":
            return found
        await asyncio.sleep(0.02)


def _chain(seen: list[tuple[BlockStored, list[BlockKey]]], ids: Sequence[int], block_size: int,
           n_blocks: int) -> tuple[BlockStored, list[BlockKey]] | None:
    head = list(ids[:block_size])
    for ev, keys in seen:
        if ev.parent_block_hash is None and list(ev.token_ids[:block_size]) == head:
            out = list(keys)
            last = ev.block_hashes[-1] if ev.block_hashes else None
            tokens = list(ev.token_ids)
            progressed = True
            while progressed and len(out) < n_blocks:
                progressed = False
                for nxt, nkeys in seen:
                    if nxt.parent_block_hash is not None and nxt.parent_block_hash == last and nxt.block_hashes:
                        out += nkeys
                        tokens += list(nxt.token_ids)
                        last, progressed = nxt.block_hashes[-1], True
                        break
            n = min(len(tokens), n_blocks * block_size)
            if tokens[:n] != list(ids[:n]):
                return None
            return ev, out[:n_blocks]
    return None


async def _post(client: httpx.AsyncClient, url: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    resp = await client.post(url, json=body, timeout=timeout_s)
    resp.raise_for_status()
    usage = resp.json().get("usage")
    if not isinstance(usage, dict):
        raise ValueError("the engine's answer has no usage")
    return usage
