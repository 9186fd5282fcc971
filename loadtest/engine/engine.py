"""One simulated engine: its cache, scheduler, event publisher, counters and generated tokens.

A request's life (``Run``): wait for admission (FIFO, slots, blocks), prefill the
uncached part of the prompt, then decode ``max_tokens`` tokens, caching each block as it
fills, and let go of the blocks at the end (or when the client goes away). Each
scheduling moment is one "engine step", and its cache events go out as one batch.

Generated tokens are drawn from the tokenizer's plain-word tokens with a RNG seeded by
(seed, prompt), so the same request always gets the same reply and the reply text
re-tokenizes to the same ids when a multi-turn workload appends it.

It owns a request's path through the engine; HTTP lives in ``app``, sockets in ``events``.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from array import array
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer

from loadtest.engine.cache import HASH_ALGO, Cleared, PrefixCache, SeqBlocks, chain_digests
from loadtest.engine.events import EventPublisher
from loadtest.engine.faults import Faults
from loadtest.engine.timing import Scheduler, TimingConfig

SIM_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "sim-model"


class EngineRestarted(ConnectionAbortedError):
    """The engine restarted while this request ran; its stream is cut."""


@dataclass(frozen=True)
class EngineConfig:
    model: str = "sim-model"
    block_size: int = 16
    cache_blocks: int = 2048  # 32k tokens at block size 16: a small GPU's worth, easy to fill in churn tests
    timing: TimingConfig = field(default_factory=TimingConfig)
    loras: tuple[str, ...] = ()
    seed: int = 0
    max_model_len: int = 32768
    default_max_tokens: int = 16


@dataclass
class EngineStats:
    requests: int = 0  # generation requests accepted
    requests_ok: int = 0
    requests_failed: int = 0  # injected errors, cut streams, restarts
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_tokens: int = 0


class Vocabulary:
    """The tokenizer's plain-word tokens (" word"), from which replies are drawn."""

    def __init__(self, tokenizer_dir: Path) -> None:
        tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        words = sorted(i for s, i in tok.get_vocab().items() if re.fullmatch("Ġ[a-z]{2,}", s))
        self.ids = words
        self.text = {i: tok.decode([i]) for i in words}
        self.size = int(tok.get_vocab_size(with_added_tokens=True))


class Engine:
    """State of one simulated vLLM engine. One event loop owns it."""

    def __init__(
        self,
        config: EngineConfig,
        vocab: Vocabulary,
        publisher: EventPublisher | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.config = config
        self.model = config.model
        self.vocab = vocab
        self.publisher = publisher
        self.faults = faults or Faults()
        self.hash_algo = HASH_ALGO
        self.rng = random.Random(config.seed)  # fault draws only; replies use their own seeded RNG
        self.generation = 0
        self._cleared_pending = False
        self._new_state()

    def _new_state(self) -> None:
        self.cache = PrefixCache(self.config.cache_blocks, self.config.block_size)
        self.scheduler = Scheduler(self.cache, self.config.timing, self.step_done)
        self.stats = EngineStats()
        self.start_time = time.time()

    @cached_property
    def served_models(self) -> tuple[str, ...]:
        return (self.model, *self.config.loras)

    def step_done(self) -> None:
        """End of an engine step: this step's cache events go out as one batch."""
        events = self.cache.take_events()
        if self._cleared_pending:
            events.insert(0, Cleared())
            self._cleared_pending = False
        if self.publisher is not None and events:
            self.publisher.publish(events)

    def reset_prefix_cache(self) -> bool:
        """As vLLM: refused while requests hold blocks; AllBlocksCleared rides the next step's batch."""
        if not self.cache.reset():
            return False
        self._cleared_pending = True
        return True

    def restart(self) -> None:
        """A new engine process: empty cache, counters at 0, event sequence at 0, requests cut."""
        self.scheduler.abort_all()
        self.generation += 1
        self._cleared_pending = False
        self._new_state()
        if self.publisher is not None:
            self.publisher.restart()

    def start(
        self,
        prompt: list[int],
        max_tokens: int,
        *,
        lora_name: str | None = None,
        salt: str | None = None,
        seed: int | None = None,
    ) -> Run:
        seq = SeqBlocks(self.cache, list(prompt), len(prompt), lora_name=lora_name, salt=salt)
        seq.digests = chain_digests(prompt, self.cache.block_size, lora_name=lora_name, salt=salt)
        return Run(self, seq, max_tokens, self.config.seed if seed is None else seed)

    def fits(self, prompt_len: int, max_tokens: int) -> bool:
        bs = self.cache.block_size
        return -(-(prompt_len + max_tokens - 1) // bs) <= self.cache.num_blocks


class Run:
    """One request inside the engine. Always ``close()`` it (a finally), even after an error."""

    def __init__(self, engine: Engine, seq: SeqBlocks, max_tokens: int, seed: int) -> None:
        self.engine = engine
        self.seq = seq
        self.max_tokens = max_tokens
        self.generation = engine.generation
        self.scheduler = engine.scheduler
        self.stats = engine.stats
        self.generated: list[int] = []
        self.cached_tokens = 0
        self._admitted = False
        self._closed = False
        digest = hashlib.blake2b(
            array("I", seq.tokens).tobytes(), digest_size=8, key=seed.to_bytes(8, "big", signed=True)
        ).digest()
        self._rng = random.Random(int.from_bytes(digest, "big"))
        self.stats.requests += 1

    @property
    def prompt_tokens(self) -> int:
        return self.seq.prompt_len

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.max_tokens

    def _check_alive(self) -> None:
        if self.engine.generation != self.generation:
            raise EngineRestarted("engine restarted")

    async def prefill(self) -> int:
        """Wait for admission, prefill, sample the first token; returns the cached prompt tokens."""
        hits = await self.scheduler.admit(self.seq, self.max_tokens)
        self._admitted = True
        self._check_alive()
        self.cached_tokens = hits * self.seq.cache.block_size
        self.stats.prompt_tokens += self.prompt_tokens
        self.stats.cached_tokens += self.cached_tokens
        await self.scheduler.prefill(self.prompt_tokens - self.cached_tokens)
        self._check_alive()
        self._sample()
        return self.cached_tokens

    async def next_token(self) -> int:
        """One decode step: compute the last token (caching a block it fills), sample the next."""
        await self.scheduler.decode_step()
        self._check_alive()
        self.seq.schedule_decode()
        self.engine.step_done()
        return self._sample()

    def _sample(self) -> int:
        token = self._rng.choice(self.engine.vocab.ids)
        self.generated.append(token)
        self.seq.tokens.append(token)
        self.stats.generation_tokens += 1
        return token

    def close(self, ok: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self.generation == self.engine.generation:
            if ok:
                self.stats.requests_ok += 1
            else:
                self.stats.requests_failed += 1
            if self._admitted:
                self.scheduler.finish(self.seq)
                self.engine.step_done()
