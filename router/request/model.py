"""The parsed request the router routes on: ``RoutingRequest``.

Owns the shape only; ``router.request.parse`` builds it from raw bytes and
``router.request.prompt`` turns it into token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["completion", "chat"]


@dataclass(slots=True)
class RoutingRequest:
    kind: Kind
    model: str
    """The requested model or LoRA adapter name; also the key namespace."""
    body: dict[str, Any]
    """The client's JSON body, forwarded upstream (the pipeline may add stream_options)."""
    raw: bytes
    """The client's bytes, forwarded unchanged when the body needs no edit."""
    stream: bool = False
    include_usage: bool = False
    """The client asked for the usage chunk itself (stream_options.include_usage)."""
    cache_salt: str | None = None
    max_tokens: int | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_text: str | None = None
    prompt_ids: list[int] | None = None
    n_prompts: int = 1
    """Completions accept a batch of prompts; keys come from the first, feedback only when 1."""
    add_special_tokens: bool | None = None
    """vLLM's override of the default (True for completions, False for chat: the template writes BOS)."""
    truncate_prompt_tokens: int | None = None
    """vLLM keeps only the last k prompt tokens; the keys must be those of what the engine keeps."""
    chat_options: dict[str, Any] = field(default_factory=dict)
    """add_generation_prompt, continue_final_message, tools, chat_template_kwargs."""
    edited: bool = False
    """``body`` was changed (e.g. a server-derived cache_salt): forward it re-serialized, not ``raw``."""

    def set_salt(self, salt: str | None) -> None:
        """Replace the cache salt, in the keys and in what the engine receives."""
        if salt == self.cache_salt:
            return
        self.cache_salt = salt
        if salt is None:
            self.body.pop("cache_salt", None)
        else:
            self.body["cache_salt"] = salt
        self.edited = True
