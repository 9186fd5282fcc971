"""The router's OpenAPI document (``GET /openapi.json``), written out by hand.

The hot endpoints are plain Starlette routes (no FastAPI models to generate it from), so
the schema is declared here, next to the routes, for clients and for schema-driven fuzzing
(schemathesis). It states what ``router.request.parse`` enforces; fields the router passes
through to the engine untouched are allowed (``additionalProperties``).
"""

from __future__ import annotations

from typing import Any

from router.request.parse import MAX_TOKENS_LIMIT

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "string"},
        "param": {"type": ["string", "null"]}}}},
}
_TOKENS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_COMMON: dict[str, Any] = {
    "model": {"type": "string", "minLength": 1},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "cache_salt": {"type": "string", "minLength": 1},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS_LIMIT},
}
_COMPLETION = {
    "type": "object", "required": ["model", "prompt"], "additionalProperties": True,
    "properties": {**_COMMON, "prompt": {"oneOf": [
        {"type": "string"},
        {"type": "array", "minItems": 1, "items": {"type": "string"}},
        _TOKENS,
        {"type": "array", "minItems": 1, "items": _TOKENS},
    ]}},
}
_PART = {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}, "text": {"type": "string"}}}
_MESSAGE = {
    "type": "object", "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "user", "assistant", "tool", "function", "developer"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": _PART}]},
    },
}
_CHAT = {
    "type": "object", "required": ["model", "messages"], "additionalProperties": True,
    "properties": {**_COMMON, "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
                   "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS_LIMIT},
                   "add_generation_prompt": {"type": "boolean"},
                   "continue_final_message": {"type": "boolean"}},
}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": "error", "content": {"application/json": {"schema": _ERROR}}}
            for s in statuses}


def _post(body: dict[str, Any], summary: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {"200": {"description": "the engine's answer (JSON, or SSE when stream is true)",
                              "headers": {"x-cache-router-backend": {"schema": {"type": "string"}},
                                          "x-cache-router-matched-tokens": {"schema": {"type": "integer"}}}},
                      **_errors(400, 401, 404, 413, 429, 502, 503, 504)},
    }}


def _get(summary: str, *errors: int) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": {"description": "ok"}, **_errors(*errors)}}}


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "cache-router", "version": "0.1.0",
             "description": "A cache-aware router in front of OpenAI-compatible LLM engines."},
    "paths": {
        "/v1/completions": _post(_COMPLETION, "Completion, routed to the replica holding the prompt's prefix"),
        "/v1/chat/completions": _post(_CHAT, "Chat completion, routed like completions"),
        "/debug/route": _post({"oneOf": [_COMPLETION, _CHAT]}, "Dry run: each replica's matched tokens, "
                              "load and score, and the would-be pick, without sending"),
        "/v1/models": _get("Models and adapters served by healthy replicas", 401),
        "/health": _get("Liveness"),
        "/ready": _get("Readiness: some replica is healthy", 503),
        "/metrics": _get("Prometheus metrics"),
    },
}
