"""Text workloads from a seed: shared_prefix, multi_turn, hot_prefix, zero_reuse, churn.

Every generator is a pure function of (seed, parameters): the same inputs give the same
prompts byte for byte, which is what makes arms of a comparison comparable.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from loadtest.workloads.model import Conversation, Turn, Workload
from loadtest.workloads.text import WordSource


@dataclass(frozen=True)
class TextParams:
    """Knobs of the text workloads; defaults give a run of a few seconds on a sim fleet."""

    requests: int = 200            # total requests (turns) generated
    groups: int = 8                # shared_prefix: distinct system prompts
    system_tokens: int = 512       # shared part of each prompt
    question_tokens: int = 64      # unique tail of each prompt
    output_tokens: int = 32        # max_tokens asked for
    turns: int = 4                 # multi_turn: turns per conversation
    hot_fraction: float = 0.8      # hot_prefix: share of requests on the one hot prefix
    capacity_tokens: int = 4 * 2048 * 16  # churn: the fleet's total cache (engines x blocks x block size)
    churn_factor: float = 3.0      # churn: distinct prefix tokens / fleet cache tokens


def shared_prefix(seed: int, p: TextParams, words: WordSource) -> list[Conversation]:
    """``groups`` system prompts, each shared by requests/groups questions; order shuffled."""
    systems = [words.tagged(f"Group {g}:", p.system_tokens) for g in range(p.groups)]
    rng = random.Random(f"shared_prefix:{seed}")
    order = [i % p.groups for i in range(p.requests)]
    rng.shuffle(order)
    return [Conversation(i, (Turn(words.text(p.question_tokens), max_tokens=p.output_tokens),), system=systems[g])
            for i, g in enumerate(order)]


def multi_turn(seed: int, p: TextParams, words: WordSource) -> list[Conversation]:
    """requests/turns conversations of ``turns`` turns; each turn carries the whole history."""
    n_conv = max(1, p.requests // max(1, p.turns))
    return [Conversation(c, tuple(Turn(words.text(p.question_tokens), max_tokens=p.output_tokens)
                                  for _ in range(p.turns)),
                         system=words.tagged(f"Session {c}:", p.system_tokens))
            for c in range(n_conv)]


def hot_prefix(seed: int, p: TextParams, words: WordSource) -> list[Conversation]:
    """One system prompt on ``hot_fraction`` of requests, the rest each with a cold prefix of its own."""
    hot = words.tagged("Hot:", p.system_tokens)
    rng = random.Random(f"hot_prefix:{seed}")
    out = []
    for i in range(p.requests):
        system = hot if rng.random() < p.hot_fraction else words.tagged(f"Cold {i}:", p.system_tokens)
        out.append(Conversation(i, (Turn(words.text(p.question_tokens), max_tokens=p.output_tokens),), system=system))
    return out


def zero_reuse(seed: int, p: TextParams, words: WordSource) -> list[Conversation]:
    """The control: every prompt distinct from its first block; no router can hit anything."""
    return [Conversation(i, (Turn(words.text(p.question_tokens), max_tokens=p.output_tokens),),
                         system=words.tagged(f"Unique {i}:", p.system_tokens))
            for i in range(p.requests)]


def churn_prefix_count(p: TextParams) -> int:
    """Distinct prefixes so that their tokens exceed the fleet's cache ``churn_factor`` times."""
    return max(2, -(-int(p.capacity_tokens * p.churn_factor) // max(1, p.system_tokens)))


def churn(seed: int, p: TextParams, words: WordSource) -> list[Conversation]:
    """Prefixes drawn uniformly from a set larger than the fleet's cache: reuse exists, evictions never stop.

    Each prefix is used about requests/prefixes times, so ask for several times more
    requests than ``churn_prefix_count`` for reuse to show; ``build_text`` records how
    many distinct prefix tokens were really sent and whether they exceed the cache.
    """
    n_prefix = churn_prefix_count(p)
    systems = [words.tagged(f"Churn {k}:", p.system_tokens) for k in range(n_prefix)]
    rng = random.Random(f"churn:{seed}")
    return [Conversation(i, (Turn(words.text(p.question_tokens), max_tokens=p.output_tokens),),
                         system=systems[rng.randrange(n_prefix)])
            for i in range(p.requests)]


_COMMON = ("requests", "system_tokens", "question_tokens", "output_tokens")
RELEVANT = {  # the parameters each generator reads, so reports show only those
    "shared_prefix": (*_COMMON, "groups"),
    "multi_turn": (*_COMMON, "turns"),
    "hot_prefix": (*_COMMON, "hot_fraction"),
    "zero_reuse": _COMMON,
    "churn": (*_COMMON, "capacity_tokens", "churn_factor"),
}

GENERATORS = {
    "shared_prefix": shared_prefix,
    "multi_turn": multi_turn,
    "hot_prefix": hot_prefix,
    "zero_reuse": zero_reuse,
    "churn": churn,
}


def build_text(name: str, seed: int, params: TextParams, words: WordSource | None = None) -> Workload:
    source = words or WordSource(seed)
    conversations = GENERATORS[name](seed, params, source)
    info: dict[str, Any] = {k: v for k, v in asdict(params).items() if k in RELEVANT[name]}
    if name == "churn":
        used = {c.system for c in conversations}
        info["distinct_prefixes"] = len(used)
        info["distinct_prefix_tokens"] = len(used) * params.system_tokens
        info["exceeds_capacity"] = len(used) * params.system_tokens > params.capacity_tokens
    return Workload(name, seed, tuple(conversations), info)
