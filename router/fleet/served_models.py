"""What a replica serves, from its OpenAI ``/v1/models``: the base model and its LoRA adapters.

vLLM lists the base model with ``parent: null`` and each adapter with ``parent`` set to
the base; servers that do not set ``parent`` list only base models. The base model's
name is the key namespace of blocks with no LoRA name (``Backend.base_model``).
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson


def parse_models(body: Any) -> tuple[str | None, frozenset[str]]:
    """(base model, every served id) from a /v1/models JSON body; ValueError if malformed."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise ValueError("/v1/models answer has no 'data' list")
    ids: list[str] = []
    base: str | None = None
    for entry in body["data"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        ids.append(entry["id"])
        if base is None and entry.get("parent") is None:
            base = entry["id"]
    return base, frozenset(ids)


async def fetch_models(client: httpx.AsyncClient, base_url: str, timeout_s: float) -> tuple[str | None, frozenset[str]]:
    response = await client.get(f"{base_url}/v1/models", timeout=timeout_s)
    response.raise_for_status()
    return parse_models(orjson.loads(response.content))
