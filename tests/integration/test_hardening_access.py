"""Tenants and access control through the real router: API keys on the OpenAI endpoints
(401 in OpenAI's shape), probes and scrapes left open, the admin token on /debug/route (403
without it), server-derived cache salts in the router's keys and in what the engine receives,
so identical prompts never match across tenants even when a client sends another tenant's
salt, while a tenant (or a shared-salt group) still hits its own cache. Secrets never logged.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest.engine import SimFleet
from router.tenancy import derive_salt
from tests.conftest import SIM_MODEL
from tests.support.router import running_router, scripted_engines
from tests.support.servers import UvicornThread

KEYS = {"acme": "sk-acme-0123456789", "globex": "sk-globex-9876543210", "acme-eu": "sk-acme-eu-5555"}
SECRET = "salt-secret-never-logged"
ADMIN = "admin-token-never-logged"
MESSAGES = [{"role": "system", "content": "You are the board's assistant. Figures are confidential. " * 6},
            {"role": "user", "content": "Summarise the quarter."}]


def _auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


def _auth_config(tmp: Path) -> dict[str, Any]:
    (tmp / "salt").write_text(SECRET + "\n")
    (tmp / "admin").write_text(ADMIN + "\n")
    return {"api_keys": [{"sha256": hashlib.sha256(k.encode()).hexdigest(), "tenant": t} for t, k in KEYS.items()],
            "salt_secret_file": str(tmp / "salt"), "admin_token_file": str(tmp / "admin"),
            "shared_salt_groups": {"acme-group": ["acme", "acme-eu"]}}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[SimFleet, UvicornThread]]:
    with SimFleet(2, block_size=16) as fleet, \
            running_router(backends=fleet.urls, tokenizer=str(SIM_MODEL), block_size=16,
                           auth=_auth_config(tmp_path)) as router:
        yield fleet, router


def _chat(router: UvicornThread, tenant: str | None, **extra: Any) -> httpx.Response:
    body = {"model": "sim-model", "messages": MESSAGES, "max_tokens": 2, **extra}
    return httpx.post(router.url + "/v1/chat/completions", json=body,
                      headers=_auth(tenant) if tenant else {}, timeout=10)


def _plan(router: UvicornThread, tenant: str) -> dict[str, Any]:
    body = {"model": "sim-model", "messages": MESSAGES}
    r = httpx.post(router.url + "/debug/route", json=body, timeout=10,
                   headers={**_auth(tenant), "x-admin-token": ADMIN})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _matched(plan: dict[str, Any]) -> int:
    return max(int(r["matched_tokens"]) for r in plan["replicas"])


def test_keys_required_on_openai_endpoints_probes_and_scrapes_stay_open(
        stack: tuple[SimFleet, UvicornThread]) -> None:
    _, router = stack
    before = _matched(_plan(router, "acme"))
    for method, path in [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")]:
        for headers in [{}, {"authorization": "Bearer sk-wrong"}, {"authorization": "Basic " + KEYS["acme"]},
                        {"authorization": "Bearer"}, {"x-api-key": KEYS["acme"]}]:
            r = httpx.request(method, router.url + path, headers=headers, timeout=10,
                              json={"model": "sim-model", "messages": MESSAGES, "prompt": "x"})
            assert r.status_code == 401, (path, headers, r.status_code)
            err = r.json()["error"]
            assert err["type"] and err["code"] and err["message"]
            assert KEYS["acme"] not in r.text
    assert httpx.get(router.url + "/v1/models", headers=_auth("acme")).status_code == 200
    for path in ["/health", "/ready", "/metrics", "/openapi.json"]:
        assert httpx.get(router.url + path, timeout=10).status_code == 200, path
    assert _matched(_plan(router, "acme")) == before  # refused requests recorded nothing


def test_debug_route_needs_the_admin_token(stack: tuple[SimFleet, UvicornThread]) -> None:
    _, router = stack
    body = {"model": "sim-model", "prompt": "hello"}
    for headers in [_auth("acme"), {**_auth("acme"), "x-admin-token": "wrong"}, {"authorization": "Bearer wrong"}]:
        r = httpx.post(router.url + "/debug/route", json=body, headers=headers, timeout=10)
        assert r.status_code == 403, (headers, r.status_code)
        assert r.json()["error"]["code"]
    ok = httpx.post(router.url + "/debug/route", json=body, headers={**_auth("acme"), "x-admin-token": ADMIN})
    assert ok.status_code == 200


def test_zero_cross_tenant_matches_on_router_and_engine_even_with_a_stolen_salt(
        stack: tuple[SimFleet, UvicornThread]) -> None:
    fleet, router = stack
    first = _chat(router, "acme")
    assert first.status_code == 200 and first.headers["x-cache-router-matched-tokens"] == "0"
    again = _chat(router, "acme")
    hit = int(again.headers["x-cache-router-matched-tokens"])
    assert hit > 0 and again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == hit
    # acme-eu shares acme's salt on purpose (one group).
    eu = _chat(router, "acme-eu")
    assert int(eu.headers["x-cache-router-matched-tokens"]) == hit

    # globex's first request ever carries acme's real derived salt: it must find nothing.
    acme_salt = derive_salt(SECRET, "group\x00acme-group")
    stolen = _chat(router, "globex", cache_salt=acme_salt)
    assert stolen.status_code == 200
    assert stolen.headers["x-cache-router-matched-tokens"] == "0"
    assert stolen.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # The stolen salt was replaced by globex's own: globex now hits what that request cached.
    own = _chat(router, "globex", cache_salt="acme")
    assert int(own.headers["x-cache-router-matched-tokens"]) == hit
    assert own.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == hit
    # An unauthenticated client cannot probe at all.
    assert _chat(router, None, cache_salt=acme_salt).status_code == 401
    engines = [fleet.stats(i) for i in range(2)]
    print(f"\ncross-tenant: acme hit {hit} tokens, acme-eu (same group) hit {hit}; globex with acme's salt "
          f"matched 0 / engine cached 0, then its own {hit}; engine requests {[e['requests'] for e in engines]}")


def test_engine_receives_the_server_derived_salt_not_the_clients(tmp_path: Path) -> None:
    with scripted_engines(1) as (engine,), \
            running_router(backends=[engine.url], tokenizer=str(SIM_MODEL), auth=_auth_config(tmp_path)) as router:
        for salt in (None, "client-chosen", derive_salt(SECRET, "tenant\x00globex")):
            body = {"model": "sim-model", "prompt": "hello " * 40, "max_tokens": 1}
            if salt:
                body["cache_salt"] = salt
            assert httpx.post(router.url + "/v1/completions", json=body, headers=_auth("globex")).status_code == 200
        forwarded = [r.get("cache_salt") for r in engine.requests]
        assert forwarded == [derive_salt(SECRET, "tenant\x00globex")] * 3


def test_secrets_and_prompts_never_reach_the_logs(stack: tuple[SimFleet, UvicornThread],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    _, router = stack
    with caplog.at_level(logging.DEBUG):
        _chat(router, "acme")
        _chat(router, None)
        httpx.post(router.url + "/debug/route", json={"model": "sim-model", "prompt": "x"},
                   headers={"x-admin-token": "wrong-" + ADMIN})
        text = "\n".join(r.getMessage() for r in caplog.records)
    for secret in [SECRET, ADMIN, *KEYS.values(), "confidential"]:
        assert secret not in text


def test_debug_route_is_off_without_an_admin_token() -> None:
    """No admin token configured: the dry run (which reveals who holds which prefix) does not exist."""
    from router.config import RouterConfig

    with SimFleet(1) as fleet:
        cfg = RouterConfig.model_validate({"backends": [{"url": fleet.urls[0]}], "port": 0})
        with running_router(config=cfg) as router:
            r = httpx.post(router.url + "/debug/route", json={"model": "sim-model", "prompt": "x"},
                           headers={"x-admin-token": "anything"}, timeout=10)
            assert r.status_code == 404 and r.json()["error"]["type"]
