"""The router's keys match a real vLLM engine's prefix cache, request by request.

Library level (no gateway): the router's tokenizer renders and tokenizes, its key
chain and an approximate-mode ``MemoryBlockIndex`` predict matched tokens, and each
prediction must equal the engine's ``usage.prompt_tokens_details.cached_tokens``;
the router's token ids must equal the ids vLLM echoes (``return_token_ids``).
Each scenario starts from an empty engine cache and stays well under its 64 blocks,
so no eviction can blur the comparison (evictions are the events tests' subject).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from router.hashing.tokenizer import ModelTokenizer
from router.types import BackendId
from tests.vllm.engine import BLOCK_SIZE, SERVED_MODEL, VllmEngine
from tests.vllm.exchange import Exchange
from tests.vllm.prediction import KeyPredictor, Words

pytestmark = pytest.mark.vllm


@pytest.fixture
def tokenizer(tiny_model_dir: Path) -> ModelTokenizer:
    # The directory vLLM serves, as a router would be configured in production.
    return ModelTokenizer.from_dir(tiny_model_dir)


@pytest.fixture
async def exchange(fresh_engine: VllmEngine, tokenizer: ModelTokenizer) -> AsyncIterator[Exchange]:
    client = openai.AsyncOpenAI(
        base_url=f"{fresh_engine.url}/v1", api_key="unused", max_retries=0, timeout=60.0
    )
    predictor = KeyPredictor(BLOCK_SIZE, SERVED_MODEL, BackendId(fresh_engine.url))
    yield Exchange(client, tokenizer, predictor)
    await client.close()


async def reset(engine: VllmEngine, exchange: Exchange) -> None:
    engine.reset_prefix_cache()
    await exchange.predictor.forget()


async def test_completions_sharing_a_prefix_in_several_orders(
    fresh_engine: VllmEngine, exchange: Exchange, tokenizer: ModelTokenizer
) -> None:
    words = Words(tokenizer, seed=1)
    prefix = words.text(100)  # 101 tokens with BOS: 3 full blocks shared
    prompts = {"A": prefix + words.text(10), "B": prefix + words.text(40), "C": prefix + words.text(3)}
    for order in itertools.islice(itertools.permutations("ABC"), 3):
        await reset(fresh_engine, exchange)
        for name in order:
            await exchange.completion(f"order {''.join(order)}: {name}", prompts[name])
        await exchange.completion(f"order {''.join(order)}: {order[0]} again", prompts[order[0]])
    exchange.assert_all_match()
    # Hand-derived: the second and third prompt of each order hit the 3 shared blocks.
    assert [r.cached for r in exchange.rows[1:3]] == [96, 96], exchange.table()


async def test_completion_lengths_around_block_boundaries(
    fresh_engine: VllmEngine, exchange: Exchange, tokenizer: ModelTokenizer
) -> None:
    words = Words(tokenizer, seed=2).text(200).split()  # one token each: n-1 words + BOS = n tokens
    lengths = [64, 64, 65, 63, 96, 96, 97, 31, 32, 33, 128, 127, 160]
    for n in lengths:
        prompt = " " + " ".join(words[: n - 1])
        row = await exchange.completion(f"{n} tokens", prompt)
        assert row.prompt_tokens == n, exchange.table()
    exchange.assert_all_match()
    cached = [r.cached for r in exchange.rows]
    # A fully cached prompt is capped at prompt_tokens - 1 rounded down to blocks (fact sheet).
    assert cached[1] == 32 and cached[5] == 64 and cached[8] == 0, exchange.table()


async def test_fully_cached_prompt_is_capped_one_token_short(
    fresh_engine: VllmEngine, exchange: Exchange, tokenizer: ModelTokenizer
) -> None:
    prompt = " " + " ".join(Words(tokenizer, seed=3).text(95).split())  # 96 tokens: 3 full blocks
    first = await exchange.completion("96 tokens", prompt)
    second = await exchange.completion("96 tokens again", prompt)
    token_prompt = tokenizer.encode_completion(prompt)
    third = await exchange.completion("same, as token ids", token_prompt)
    exchange.assert_all_match()
    assert (first.cached, second.cached, third.cached) == (0, 64, 64), exchange.table()


async def test_cache_salts_never_match_each_other(
    fresh_engine: VllmEngine, exchange: Exchange, tokenizer: ModelTokenizer
) -> None:
    words = Words(tokenizer, seed=4)
    prompt = words.text(80)
    longer = prompt + words.text(40)
    for salt in (None, "tenant-a", "tenant-b", "tenant-a", None, "tenant-b", "tenant-c"):
        await exchange.completion(f"salt {salt}", prompt, salt=salt)
    await exchange.completion("salt tenant-a, longer", longer, salt="tenant-a")
    await exchange.completion("salt tenant-c, longer", longer, salt="tenant-c")
    exchange.assert_all_match()
    assert [r.cached for r in exchange.rows] == [0, 0, 0, 64, 64, 64, 0, 64, 64], exchange.table()


async def test_chat_sharing_a_system_prompt_in_several_orders(
    fresh_engine: VllmEngine, exchange: Exchange, tokenizer: ModelTokenizer
) -> None:
    words = Words(tokenizer, seed=5)
    system = {"role": "system", "content": "You are terse." + words.text(70)}
    users = {
        name: {"role": "user", "content": words.text(n).strip()}
        for name, n in (("A", 5), ("B", 37), ("C", 70))
    }
    for order in ("ABC", "CBA", "BAC"):
        await reset(fresh_engine, exchange)
        for name in order:
            await exchange.chat(f"order {order}: {name}", [system, users[name]])
    exchange.assert_all_match()
    assert exchange.rows[1].cached >= 64, exchange.table()


async def test_multi_turn_chat_hits_the_previous_turns(
    fresh_engine: VllmEngine, exchange: Exchange, tokenizer: ModelTokenizer
) -> None:
    words = Words(tokenizer, seed=6)
    history: list[dict[str, str]] = [{"role": "system", "content": "Answer in one word." + words.text(20)}]
    for turn in range(5):
        history.append({"role": "user", "content": f"Question {turn}:" + words.text(13 + 9 * turn)})
        await exchange.chat(f"turn {turn}", history)
        history.append({"role": "assistant", "content": words.text(7 + turn).strip()})
    await exchange.chat("last turn, salted", history[:-1], salt="s1")
    await exchange.chat("last turn, salted again", history[:-1], salt="s1")
    exchange.assert_all_match()
    assert all(r.cached > 0 for r in exchange.rows[1:5]), exchange.table()


async def test_chat_rendering_variants_match(
    fresh_engine: VllmEngine, exchange: Exchange, tokenizer: ModelTokenizer
) -> None:
    words = Words(tokenizer, seed=7)
    system = {"role": "system", "content": "Be kind." + words.text(40)}
    question = words.text(30).strip()
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": question[:40]}, {"type": "text", "text": question[40:]}],
    }
    await exchange.chat("content as parts", [system, parts])
    await exchange.chat("content as parts again", [system, parts])
    await exchange.chat("no generation prompt", [system, {"role": "user", "content": question}],
                        add_generation_prompt=False)  # fmt: skip
    prefill = [
        system,
        {"role": "user", "content": question},
        {"role": "assistant", "content": "Sure," + words.text(9)},
    ]
    await exchange.chat(
        "continue final message", prefill, add_generation_prompt=False, continue_final_message=True
    )
    await exchange.chat("generation prompt", [system, {"role": "user", "content": question}])
    exchange.assert_all_match()


TRICKY = [
    "Ünïcödé — naïve café, 日本語のテキスト, emoji 🚀🔥 and a zero\u200bwidth joiner.",
    "  leading spaces,\ttabs,\n\nblank lines,   runs   of   spaces  \n",
    "literal specials: <s> hello </s> <|im_start|>user\nnot a turn<|im_end|> <unk>",
    "code: def f(x):\n    return {'a': [1, 2.5e-3, None]}  # comment\r\n",
    "digits 1234567890 3.14159 -42 0x1F and URLs https://example.org/a?b=c&d=e",
]


async def test_tricky_text_tokenizes_identically(
    fresh_engine: VllmEngine, exchange: Exchange, tokenizer: ModelTokenizer
) -> None:
    for i, text in enumerate(TRICKY):
        await exchange.completion(f"completion tricky {i}", text * 2)
        await exchange.chat(f"chat tricky {i}", [{"role": "user", "content": text * 2}])
    for i, text in enumerate(TRICKY):  # the same again: every full block now hits
        await exchange.completion(f"completion tricky {i} again", text * 2)
        await exchange.chat(f"chat tricky {i} again", [{"role": "user", "content": text * 2}])
    exchange.assert_all_match()
    assert sum(r.cached for r in exchange.rows[len(TRICKY) * 2 :]) > 0, exchange.table()


def long_text(tokenizer: ModelTokenizer, seed: int, max_tokens: int) -> str:
    """Several thousand characters of mixed text: long enough for the router's piecewise
    tokenization (router.hashing.segments), with punctuation, digits, accents and CJK at the cuts."""
    words = Words(tokenizer, seed=seed)
    seps = [
        " ",
        " ",
        " ",
        ", ",
        ". ",
        "\n",
        " — ",
        "  ",
        " (",
        ") ",
        ": ",
        "'s ",
        " 42 ",
        " naïve ",
        " 日本 ",
        "\n\n",
    ]
    parts: list[str] = []
    while len(tokenizer.encode("".join(parts), add_special_tokens=False)) < max_tokens:
        parts.extend(words.rng.choice(words.words) + words.rng.choice(seps) for _ in range(20))
    text = "".join(parts)
    while len(tokenizer.encode(text, add_special_tokens=False)) > max_tokens:
        text = text[: int(len(text) * 0.95)]
    return text


async def test_long_prompts_tokenize_identically(
    fresh_engine: VllmEngine, exchange: Exchange, tokenizer: ModelTokenizer
) -> None:
    text = long_text(tokenizer, seed=8, max_tokens=900)
    assert len(text) > 2 * 1024, "too short to take the router's piecewise path"
    await exchange.completion("long", text)
    await exchange.completion("long, extended", text + " and then some more words at the end")
    await exchange.completion("long again", text)
    await reset(fresh_engine, exchange)
    chat = [{"role": "system", "content": "Summarise."}, {"role": "user", "content": text}]
    await exchange.chat("long chat", chat)
    await exchange.chat("long chat again", chat)
    exchange.assert_all_match()
    assert exchange.rows[2].cached >= 800 and exchange.rows[4].cached >= 800, exchange.table()
