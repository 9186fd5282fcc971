"""Raw body bytes -> ``RoutingRequest``, with strict validation of every field the router reads.

Anything malformed is a ``BadRequest`` (400) naming the offending field; fields the router
does not read (temperature, n, ...) are left for the engine to judge. Token ids are checked
against the model's vocabulary later, in ``router.request.prompt``, where the vocabulary
is known.
"""

from __future__ import annotations

from typing import Any

import orjson

from router.errors import BadRequest
from router.request.model import Kind, RoutingRequest

MAX_TOKENS_LIMIT = 1 << 20
"""No model generates a million tokens per request; larger values are typos or abuse."""
MAX_MESSAGES = 100_000
_ROLES = frozenset({"system", "user", "assistant", "tool", "function", "developer"})


def _bad(message: str, param: str | None = None) -> BadRequest:
    return BadRequest(message, param=param)


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"request body is not valid JSON: {exc.msg}") from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    return body


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_bool(body: dict[str, Any], name: str) -> bool | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise _bad(f"'{name}' must be a boolean", name)
    return v


def _max_tokens(body: dict[str, Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        v = body.get(name)
        if v is None:
            continue
        if not _is_int(v):
            raise _bad(f"'{name}' must be an integer", name)
        if not 1 <= v <= MAX_TOKENS_LIMIT:
            raise _bad(f"'{name}' must be between 1 and {MAX_TOKENS_LIMIT}", name)
        return int(v)
    return None


def _truncation(body: dict[str, Any]) -> int | None:
    """vLLM's ``truncate_prompt_tokens``: k >= 1 keeps the last k tokens; -1 (the model's max
    length, unknown here) and absent leave the prompt whole."""
    v = body.get("truncate_prompt_tokens")
    if v is None:
        return None
    if not _is_int(v) or v < -1 or v == 0:
        raise _bad("'truncate_prompt_tokens' must be -1 or a positive integer", "truncate_prompt_tokens")
    return int(v) if v > 0 else None


def _token_list(v: list[Any], param: str) -> list[int]:
    for t in v:
        if not _is_int(t) or t < 0:
            raise _bad("token ids must be non-negative integers", param)
    return v


def _prompt(body: dict[str, Any]) -> tuple[str | None, list[int] | None, int]:
    """(text, ids, number of prompts) of a completions ``prompt``; keys come from the first."""
    p = body.get("prompt")
    if isinstance(p, str):
        return p, None, 1
    if not isinstance(p, list) or not p:
        raise _bad("'prompt' must be a string, a list of strings, or a list of token ids (non-empty)", "prompt")
    first = p[0]
    if isinstance(first, str):
        if not all(isinstance(s, str) for s in p):
            raise _bad("'prompt' list must hold only strings or only token ids", "prompt")
        return first, None, len(p)
    if _is_int(first):
        return None, _token_list(p, "prompt"), 1
    if isinstance(first, list):
        for sub in p:
            if not isinstance(sub, list) or not sub:
                raise _bad("'prompt' as a batch of token-id lists needs non-empty lists", "prompt")
            _token_list(sub, "prompt")
        return None, first, len(p)
    raise _bad("'prompt' must be a string, a list of strings, or a list of token ids", "prompt")


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list", "messages")
    if len(msgs) > MAX_MESSAGES:
        raise _bad(f"'messages' holds more than {MAX_MESSAGES} entries", "messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise _bad(f"messages[{i}].role must be one of {sorted(_ROLES)}", "messages")
        content = m.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _bad(f"messages[{i}].content must be a string or a list of parts", "messages")
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _bad(f"messages[{i}].content parts must be objects with a 'type'", "messages")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content text parts need a string 'text'", "messages")
    return msgs


def _chat_options(body: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for name in ("add_generation_prompt", "continue_final_message"):
        v = _opt_bool(body, name)
        if v is not None:
            opts[name] = v
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("'tools' must be a list", "tools")
        opts["tools"] = tools
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise _bad("'chat_template_kwargs' must be an object", "chat_template_kwargs")
        opts["template_kwargs"] = kwargs
    return opts


def parse_request(raw: bytes, kind: Kind) -> RoutingRequest:
    """Validate a /v1/completions or /v1/chat/completions body."""
    body = parse_json(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' must be a non-empty string", "model")
    stream = bool(_opt_bool(body, "stream"))
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise _bad("'stream_options' must be an object", "stream_options")
        iu = opts.get("include_usage")
        if iu is not None and not isinstance(iu, bool):
            raise _bad("'stream_options.include_usage' must be a boolean", "stream_options")
        include_usage = bool(iu)
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise _bad("'cache_salt' must be a non-empty string", "cache_salt")
    req = RoutingRequest(kind=kind, model=model, body=body, raw=raw, stream=stream,
                         include_usage=include_usage, cache_salt=salt,
                         add_special_tokens=_opt_bool(body, "add_special_tokens"),
                         truncate_prompt_tokens=_truncation(body))
    if kind == "chat":
        req.messages = _messages(body)
        req.chat_options = _chat_options(body)
        req.max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
    else:
        req.prompt_text, req.prompt_ids, req.n_prompts = _prompt(body)
        req.max_tokens = _max_tokens(body, ("max_tokens",))
    return req


def guess_kind(body: dict[str, Any]) -> Kind:
    """/debug/route accepts either shape: chat when ``messages`` is present."""
    return "chat" if "messages" in body else "completion"
