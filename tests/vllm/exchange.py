"""Send prompts to a real engine with the ``openai`` client and set the router's prediction beside its answer.

One ``Exchange`` per test: it tokenizes each prompt with the router's ``ModelTokenizer``,
predicts matched tokens with a ``KeyPredictor`` before sending, sends the request
(``max_tokens=1``, so no generated token is ever cached), records the prompt's keys
as the router's approximate mode does, and keeps one ``Row`` per request so a failure
prints the whole conversation with the engine.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import openai

from router.hashing.tokenizer import ModelTokenizer
from tests.vllm.engine import SERVED_MODEL
from tests.vllm.prediction import KeyPredictor


@dataclass(frozen=True)
class Row:
    label: str
    prompt_tokens: int
    predicted: int
    cached: int
    same_tokens: bool  # router's token ids == the engine's prompt_token_ids

    @property
    def ok(self) -> bool:
        return self.same_tokens and self.predicted == self.cached


class Exchange:
    def __init__(
        self,
        client: openai.AsyncOpenAI,
        tokenizer: ModelTokenizer,
        predictor: KeyPredictor,
        *,
        settle: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``settle`` set: precise mode. The index is kept by KV events, so nothing is recorded
        at send time; ``settle`` waits after each request until the engine's events are applied."""
        self.client = client
        self.tokenizer = tokenizer
        self.predictor = predictor
        self.settle = settle
        self.rows: list[Row] = []

    async def completion(self, label: str, prompt: str | Sequence[int], salt: str | None = None) -> Row:
        ids = list(prompt) if not isinstance(prompt, str) else self.tokenizer.encode_completion(prompt)
        predicted = await self.predictor.predict(ids, salt)
        response = await self.client.completions.create(
            model=SERVED_MODEL, prompt=prompt if isinstance(prompt, str) else list(prompt), max_tokens=1,
            temperature=0.0, extra_body=_extra(salt),
        )  # fmt: skip
        await self._after(ids, salt)
        engine_ids = (response.choices[0].model_extra or {}).get("prompt_token_ids")
        return self._add(label, ids, engine_ids, predicted, response.usage)

    async def chat(
        self, label: str, messages: Sequence[Mapping[str, Any]], salt: str | None = None, **render: Any
    ) -> Row:
        ids = self.tokenizer.encode_chat(messages, **render)
        predicted = await self.predictor.predict(ids, salt)
        response = await self.client.chat.completions.create(
            model=SERVED_MODEL, messages=list(messages), max_tokens=1, temperature=0.0,  # type: ignore[arg-type]
            extra_body={**_extra(salt), **render},
        )  # fmt: skip
        await self._after(ids, salt)
        engine_ids = (response.model_extra or {}).get("prompt_token_ids")
        return self._add(label, ids, engine_ids, predicted, response.usage)

    async def _after(self, ids: list[int], salt: str | None) -> None:
        if self.settle is None:
            await self.predictor.record(ids, salt)
        else:
            await self.settle()

    def _add(self, label: str, ids: list[int], engine_ids: Any, predicted: int, usage: Any) -> Row:
        assert usage is not None and usage.prompt_tokens_details is not None, (
            "engine sent no prompt_tokens_details"
        )
        row = Row(label, usage.prompt_tokens, predicted, usage.prompt_tokens_details.cached_tokens or 0,
                  engine_ids == ids)  # fmt: skip
        self.rows.append(row)
        return row

    def table(self) -> str:
        lines = [f"{'request':<34} {'tokens':>6} {'predicted':>9} {'cached':>6} same-ids"]
        lines += [
            f"{r.label:<34} {r.prompt_tokens:>6} {r.predicted:>9} {r.cached:>6} {r.same_tokens!s:<5}"
            f"{'' if r.ok else '  <-- MISMATCH'}"
            for r in self.rows
        ]
        return "\n".join(lines)

    def assert_all_match(self) -> None:
        assert all(r.ok for r in self.rows), "router prediction != engine cached_tokens:\n" + self.table()


def _extra(salt: str | None) -> dict[str, Any]:
    extra: dict[str, Any] = {"return_token_ids": True}  # vLLM echoes the prompt ids it really used
    if salt is not None:
        extra["cache_salt"] = salt
    return extra
