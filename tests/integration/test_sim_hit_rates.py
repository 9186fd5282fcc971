"""Hit rates of the simulated fleet against figures computed without it.

The ceiling comes from an independent model: one unlimited cache keyed by the router's own
chained keys (``router.hashing.keys``, not the engine's sha256 chain), capped like vLLM
(``cacheable_blocks``). The round-robin figure is derived by hand below.
"""

from __future__ import annotations

import random
from pathlib import Path

import httpx

from loadtest.engine import SimFleet
from router.hashing.keys import cacheable_blocks, prompt_keys
from router.hashing.tokenizer import ModelTokenizer

BS = 16


def ceiling_per_request(prompts: list[list[int]]) -> list[int]:
    """Cached tokens each request would get from one cache that never evicts."""
    seen: set[int] = set()
    out = []
    for tokens in prompts:
        keys = prompt_keys(tokens, BS, "sim-model")
        limit = cacheable_blocks(len(tokens), BS)
        n = 0
        while n < min(limit, len(keys)) and keys[n] in seen:
            n += 1
        out.append(n * BS)
        seen.update(keys)
    return out


def test_direct_to_one_big_engine_reaches_the_ceiling(sim_model_dir: Path) -> None:
    tok = ModelTokenizer.from_dir(sim_model_dir)
    rng = random.Random(7)
    words = [
        "cache",
        "route",
        "block",
        "prefix",
        "engine",
        "token",
        "queue",
        "batch",
        "replica",
        "model",
        "latency",
    ]
    systems = [" ".join(rng.choices(words, k=rng.randint(20, 120))) for _ in range(5)]
    conversations = []
    for _ in range(60):
        system = rng.choice(systems)
        question = " ".join(rng.choices(words, k=rng.randint(1, 30)))
        conversations.append([{"role": "system", "content": system}, {"role": "user", "content": question}])
    conversations += rng.sample(conversations, 10)  # exact repeats: capped at the last prompt token
    rng.shuffle(conversations)
    expected = ceiling_per_request([tok.encode_chat(m) for m in conversations])
    with (
        SimFleet(1, block_size=BS, cache_blocks=4096) as fleet,
        httpx.Client(trust_env=False, timeout=10) as http,
    ):
        got, prompt_total = [], 0
        for messages in conversations:
            body = {"model": "sim-model", "messages": messages, "max_tokens": 1}
            usage = (
                http.post(fleet.urls[0] + "/v1/chat/completions", json=body)
                .raise_for_status()
                .json()["usage"]
            )
            got.append(usage["prompt_tokens_details"]["cached_tokens"])
            prompt_total += usage["prompt_tokens"]
    assert got == expected  # request by request, not only on average
    assert sum(expected) / prompt_total > 0.5  # the workload does reuse (a 0 == 0 pass would prove nothing)


def test_round_robin_over_four_small_engines_gets_the_hand_derived_figure() -> None:
    # Workload: G groups; each group is a burst of 8 consecutive requests sharing a 64-token
    # prefix (4 blocks) with a unique 16-token suffix: 80-token prompts, max_tokens=1, so each
    # request caches exactly its 5 prompt blocks and nothing generated.
    # Each engine holds 5 blocks: exactly one request's blocks, so after a request an engine
    # caches that request and nothing else.
    #
    # Ceiling (one unlimited cache): in each burst the first request misses, the other 7 hit
    # the 4 prefix blocks (the suffix is unique): 7 * 64 / (8 * 80) = 0.7.
    # Round robin over 4 engines: request k goes to engine k % 4, so within a burst of 8 each
    # engine gets 2 requests of the group, back to back on that engine. The first misses (the
    # engine last served the previous group, whose blocks share nothing), the second hits
    # the 4 prefix blocks: per burst 4 * 64 / (8 * 80) = 0.4.
    groups, burst = 5, 8
    rng = random.Random(3)
    prompts = []
    for g in range(groups):
        prefix = [1000 + 64 * g + i for i in range(64)]
        prompts += [prefix + [rng.randrange(2, 8000) for _ in range(16)] for _ in range(burst)]
    assert sum(ceiling_per_request(prompts)) / (80 * len(prompts)) == 0.7

    with (
        SimFleet(4, block_size=BS, cache_blocks=5) as fleet,
        httpx.Client(trust_env=False, timeout=10) as http,
    ):
        cached = 0
        for k, tokens in enumerate(prompts):
            body = {"prompt": tokens, "max_tokens": 1}
            r = http.post(fleet.urls[k % 4] + "/v1/completions", json=body).raise_for_status().json()
            cached += r["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached / (80 * len(prompts)) == 0.4
        assert [fleet.stats(i)["requests"] for i in range(4)] == [10] * 4

    # The same requests straight to one engine of the same small size reach the ceiling:
    # the bursts are consecutive, so the one cached request is always the group's prefix.
    with (
        SimFleet(1, block_size=BS, cache_blocks=5) as fleet,
        httpx.Client(trust_env=False, timeout=10) as http,
    ):
        cached = sum(
            http.post(fleet.urls[0] + "/v1/completions", json={"prompt": t, "max_tokens": 1})
            .raise_for_status()
            .json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            for t in prompts
        )
        assert cached / (80 * len(prompts)) == 0.7
