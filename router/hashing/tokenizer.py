"""A model directory's tokenizer and chat template, applied the way vLLM applies them.

vLLM renders a chat request with the model's jinja chat template (``chat_template.jinja``
beside the tokenizer, else ``chat_template`` in ``tokenizer_config.json``), then
tokenizes the rendered text *without* adding special tokens (the template writes its
own BOS). A completion prompt is tokenized *with* special tokens. Getting either
wrong shifts every block and gives a 0% hit rate, so this module is the one place
that knows it; the real-vLLM tests in ``tests/vllm`` prove it matches.

This module owns loading and rendering; it refuses to own scheduling or hashing.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from router.hashing.chain_memo import ChainMemo, Encoded
from router.hashing.segments import SegmentCache, piecewise_is_exact
from router.hashing.words import WordEncoder
from router.types import BlockKey

# A template that loops over message content expects OpenAI-style lists of parts;
# any other template gets the parts' text joined with newlines, as vLLM's "auto" does.
_ITERATES_CONTENT = re.compile(r"for\s+\w+\s+in\s+(message|m|msg)(\.content|\[['\"]content['\"]\])")


class TemplateError(ValueError):
    """The chat template could not render these messages (bad roles, a raise_exception, bad types)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return value if isinstance(value, str) else None


class ModelTokenizer:
    """Tokenizer plus chat template of one model directory. Thread-safe for encoding."""

    def __init__(self, tokenizer: Tokenizer, config: Mapping[str, Any], chat_template: str | None) -> None:
        self._tok = tokenizer
        self.config = dict(config)
        self.chat_template = chat_template
        self.special_tokens = {
            name: text
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(config.get(name))) is not None
        }
        self._template: jinja2.Template | None = None
        self._globals: dict[str, Any] = {}
        self._content_as_parts = False
        if chat_template is not None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = lambda v, indent=None, **_: json.dumps(v, indent=indent, ensure_ascii=False)
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(chat_template)
            self._content_as_parts = bool(_ITERATES_CONTENT.search(chat_template))
            # Template.render copies the template's globals (a ChainMap) into every request's
            # context: 6.7 of its 9.2 µs. The same globals, flattened once, go into a shared one.
            self._globals = dict(self._template.globals)
        self._segments: SegmentCache | None = None
        self._memo: ChainMemo | None = None
        self._special_around: tuple[list[int], list[int]] | None = None
        self._words = WordEncoder.for_tokenizer(tokenizer)
        """Short new text (a prompt's unique tail) without the library's per-call cost; None
        when this tokenizer is not one it follows exactly (router.hashing.words)."""
        self.enable_segment_cache()

    def enable_segment_cache(self, *, chunk_chars: int = 1024, max_entries: int = 8192) -> bool:
        """Cache tokens of long prompts' chunks, if this tokenizer provably allows it (see segments.py)."""
        plain = self._plain_encode
        sample = [self.render_chat([{"role": "user", "content": "Hello there, how are you?"}])] if self._template else []
        if not piecewise_is_exact(plain, sample):
            self._segments = self._memo = None
            return False
        # The cache tries the word encoder itself, then the library (not the word encoder twice).
        library = functools.partial(self._ids, add_special_tokens=False)
        self._segments = SegmentCache(library, chunk_chars=chunk_chars, max_entries=max_entries,
                                      short=self._words.encode if self._words is not None else None)
        self._memo = ChainMemo(self._segments, max_entries=max_entries)
        with_sp, without = self._tok.encode("a b", add_special_tokens=True).ids, plain("a b")
        for i in range(len(with_sp) - len(without) + 1):
            if with_sp[i : i + len(without)] == without:
                self._special_around = (with_sp[:i], with_sp[i + len(without) :])
                break
        return True

    @property
    def segment_cache(self) -> SegmentCache | None:
        return self._segments

    def _plain_encode(self, text: str) -> list[int]:
        if self._words is not None:
            ids = self._words.encode(text)
            if ids is not None:
                return ids
        return self._ids(text, add_special_tokens=False)

    def _ids(self, text: str, *, add_special_tokens: bool) -> list[int]:
        # encode_batch_fast: the same ids as encode (tested), without computing offsets, and
        # with the GIL released: 1.2x faster on 400 chars, 2x on a 1024-char segment here.
        ids: list[int] = self._tok.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
        return ids

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelTokenizer:
        # One text per call: the library's Rayon pool would only add a hand-off to another
        # thread and idle threads spinning on a machine whose cores serve requests.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        root = Path(path)
        tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        config_path = root / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        template_file = root / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else config.get("chat_template")
        if isinstance(template, list):  # several named templates: vLLM uses "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return cls(tokenizer, config, template if isinstance(template, str) else None)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        segments = self._segments
        if segments is None:
            return self._ids(text, add_special_tokens=add_special_tokens)
        if not add_special_tokens:
            return segments.encode(text)
        if self._special_around is None:
            return self._ids(text, add_special_tokens=True)
        head, tail = self._special_around
        return [*head, *segments.encode(text), *tail]

    def encode_keys(self, text: str, *, add_special_tokens: bool, block_size: int,
                    seed: BlockKey, budget_chars: int | None = None) -> Encoded | None:
        """Token count and block keys of ``text`` as ``encode`` would tokenize it, reusing the
        work of earlier prompts with the same prefix (``chain_memo``); None when this tokenizer
        cannot be encoded piecewise (the caller then encodes and hashes the whole text).
        Raises ``chain_memo.OverBudget`` past ``budget_chars`` of new text."""
        memo = self._memo
        if memo is None:
            return None
        if not add_special_tokens:
            return memo.encode(text, (), (), block_size, seed, budget_chars=budget_chars)
        if self._special_around is None:
            return None
        head, tail = self._special_around
        return memo.encode(text, head, tail, block_size, seed, budget_chars=budget_chars)

    def encode_completion(self, prompt: str) -> list[int]:
        return self.encode(prompt, add_special_tokens=True)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Sequence[Any] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        if self._template is None:
            raise TemplateError("this model has no chat template; send a completion request instead")
        normalised = [self._normalise(m) for m in messages]
        context: dict[str, Any] = {**self._globals, **(template_kwargs or {}), **self.special_tokens}
        context.update(messages=normalised, add_generation_prompt=add_generation_prompt, tools=tools)
        template = self._template
        try:
            # What Template.render does, with a context built here (``shared``: no copy of the globals).
            text = "".join(template.root_render_func(template.new_context(context, shared=True)))
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise TemplateError(f"chat template failed: {exc}") from exc
        if continue_final_message and normalised:
            last = normalised[-1].get("content")
            if isinstance(last, str) and last and last in text:
                text = text[: text.rindex(last) + len(last)]
        return text

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[int]:
        return self.encode(self.render_chat(messages, **kwargs), add_special_tokens=False)

    def _normalise(self, message: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(message)
        content = out.get("content")
        if isinstance(content, list) and not self._content_as_parts:
            texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            out["content"] = "\n".join(t for t in texts if isinstance(t, str))
        elif content is None:
            out["content"] = "" if not self._content_as_parts else []
        return out
