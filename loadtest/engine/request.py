"""A generation request's JSON body -> a checked ``GenerateRequest``, or an OpenAI-style 4xx.

Completions take ``prompt`` as a string (tokenized with BOS, as vLLM does) or a list of
token ids (a batch of one is accepted); chat takes ``messages``, rendered with the model's
chat template and tokenized without special tokens. ``model`` picks the base model or a
LoRA adapter; ``cache_salt``, ``max_tokens`` (chat: also ``max_completion_tokens``),
``seed``, ``stream`` and ``stream_options.include_usage`` are honoured; other sampling
fields are accepted and ignored, as the simulator does not sample.

It owns validation; it refuses to own what the engine does with the request.
"""

from __future__ import annotations

import asyncio
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

from loadtest.engine.engine import Engine
from router.hashing.tokenizer import ModelTokenizer, TemplateError

# A prompt this long is tokenized off the event loop, so other engines in the process keep going.
_OFFLOAD_CHARS = 20_000


class ApiError(Exception):
    """An error answer in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        return orjson.dumps({"error": error})


@dataclass(frozen=True)
class GenerateRequest:
    model: str
    prompt: list[int]
    max_tokens: int
    lora_name: str | None
    salt: str | None
    seed: int | None
    stream: bool
    include_usage: bool


def load_json(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _int_field(body: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer in [{low}, {high}]", param=name)
    return value


class _TokenCache:
    """Token ids of recently seen prompts. Saves CPU only (a benchmark repeats its prompts);
    what the engine does with the ids is unchanged."""

    def __init__(self, size: int = 2048, max_chars: int = 65_536) -> None:
        self._ids: OrderedDict[bytes | str, list[int]] = OrderedDict()
        self._size = size
        self.max_chars = max_chars

    def get(self, key: bytes | str) -> list[int] | None:
        ids = self._ids.get(key)
        if ids is not None:
            self._ids.move_to_end(key)
        return ids

    def put(self, key: bytes | str, ids: list[int]) -> list[int]:
        if len(key) <= self.max_chars:
            self._ids[key] = ids
            if len(self._ids) > self._size:
                self._ids.popitem(last=False)
        return ids


class RequestParser:
    """Checks bodies against one engine's models, limits and tokenizer."""

    def __init__(self, engine: Engine, tokenizer: ModelTokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self._cache = _TokenCache()

    async def parse(self, body: dict[str, Any], *, chat: bool) -> GenerateRequest:
        engine = self.engine
        model = body.get("model")
        if model is None:  # vLLM serves its one model when none is named
            model = engine.model
        if not isinstance(model, str):
            raise ApiError(400, "model must be a string", param="model")
        if model not in engine.served_models:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        salt = body.get("cache_salt")
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise ApiError(400, "cache_salt must be a non-empty string", param="cache_salt")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be a boolean", param="stream")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        if options and not stream:  # as vLLM's request validator
            raise ApiError(
                400, "Stream options can only be defined when `stream=True`.", param="stream_options"
            )
        _int_field(body, "n", 1, 1, 1)
        seed = _int_field(body, "seed", None, -(2**63), 2**63 - 1)
        limit = engine.config.max_model_len
        max_tokens = _int_field(body, "max_tokens", None, 1, limit)
        if chat and max_tokens is None:
            max_tokens = _int_field(body, "max_completion_tokens", None, 1, limit)
        max_tokens = max_tokens or engine.config.default_max_tokens
        prompt = await (self._chat_prompt(body) if chat else self._completion_prompt(body))
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(prompt) + max_tokens > limit:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the messages, {max_tokens} in "
                "the completion).",
            )
        if not engine.fits(len(prompt), max_tokens):
            raise ApiError(400, "prompt and max_tokens exceed this engine's KV cache", param="max_tokens")
        return GenerateRequest(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            lora_name=model if model != engine.model else None,
            salt=salt,
            seed=seed,
            stream=stream,
            include_usage=bool(options and options.get("include_usage")),
        )

    async def _completion_prompt(self, body: dict[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if (ids := self._cache.get(prompt)) is not None:
                return list(ids)
            if len(prompt) > _OFFLOAD_CHARS:
                ids = await asyncio.to_thread(self.tokenizer.encode_completion, prompt)
            else:
                ids = self.tokenizer.encode_completion(prompt)
            return list(self._cache.put(prompt, ids))
        if isinstance(prompt, list):
            vocab = self.engine.vocab.size
            try:  # one C-level pass: every id an int in [0, 2**32)
                ids = array("I", prompt)
            except (TypeError, OverflowError):
                raise ApiError(400, f"token ids must be integers in [0, {vocab})", param="prompt") from None
            if ids and max(ids) >= vocab:
                raise ApiError(400, f"token ids must be in [0, {vocab})", param="prompt")
            return ids.tolist()
        raise ApiError(
            400, "prompt must be a string or a list of token ids (one prompt per request)", param="prompt"
        )

    async def _chat_prompt(self, body: dict[str, Any]) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        size = 0
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, "each message must be an object with a string role", param="messages")
            content = m.get("content")
            if not isinstance(content, str | list | None):
                raise ApiError(
                    400, "message content must be a string, a list of parts or null", param="messages"
                )
            size += len(content) if isinstance(content, str) else 0
        try:
            key = orjson.dumps(messages)
        except TypeError:
            raise ApiError(400, "messages must be JSON", param="messages") from None
        if (ids := self._cache.get(key)) is not None:
            return list(ids)
        try:
            if size > _OFFLOAD_CHARS:
                ids = await asyncio.to_thread(self.tokenizer.encode_chat, messages)
            else:
                ids = self.tokenizer.encode_chat(messages)
        except TemplateError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        return list(self._cache.put(key, ids))
