"""Tenancy through the gateway: API keys, server-derived cache salts in the router's keys and
in what the engine receives, so identical prompts never match across tenants."""

from __future__ import annotations

import hashlib

from loadtest.engine import SimFleet
from tests.conftest import SIM_MODEL
from tests.support.router import HTTP, running_router

KEYS = {"acme": "key-acme-123", "globex": "key-globex-456"}
PROMPT = "Quarterly revenue summary for the board, confidential. " * 8


def _auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


def test_tenants_never_share_prefixes_but_a_tenant_hits_its_own() -> None:
    api_keys = [{"sha256": hashlib.sha256(k.encode()).hexdigest(), "tenant": t} for t, k in KEYS.items()]
    with SimFleet(1, block_size=16) as fleet, \
            running_router(backends=fleet.urls, tokenizer=str(SIM_MODEL), block_size=16,
                           auth={"api_keys": api_keys}) as router:
        url = router.url + "/v1/completions"
        body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 2, "cache_salt": "guessable"}
        assert HTTP.post(url, json=body).status_code == 401
        assert HTTP.post(url, json=body, headers={"authorization": "Bearer wrong"}).status_code == 401

        first = HTTP.post(url, json=body, headers=_auth("acme"), timeout=10)
        assert first.status_code == 200
        again = HTTP.post(url, json=body, headers=_auth("acme"), timeout=10)
        assert int(again.headers["x-cache-router-matched-tokens"]) > 0
        assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

        # Same prompt, same client-chosen salt, other tenant: no match in the router or the engine.
        other = HTTP.post(url, json=body, headers=_auth("globex"), timeout=10)
        assert other.headers["x-cache-router-matched-tokens"] == "0"
        assert other.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        plan = HTTP.post(router.url + "/debug/route", json=body, headers=_auth("globex")).json()
        assert plan["replicas"][0]["matched_tokens"] > 0  # globex's own request is cached now
