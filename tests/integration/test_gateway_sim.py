"""The router in front of simulated vLLM engines (loadtest.engine): the openai client through
it, cached-token feedback, stale-hit correction, restart wiring and the /debug/route dry run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from loadtest.engine import SimFleet
from tests.conftest import SIM_MODEL
from tests.support.router import HTTP, metric, running_router
from tests.support.servers import UvicornThread

SYSTEM = "You are a careful assistant who answers questions about the shipping manifest. " * 6


def _router(fleet: SimFleet, **overrides: Any) -> Any:
    return running_router(backends=fleet.urls, tokenizer=str(SIM_MODEL), block_size=16,
                          scheduling={"metrics_interval_s": 0.2}, **overrides)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[SimFleet, UvicornThread]]:
    with SimFleet(2, block_size=16, cache_blocks=512) as fleet, _router(fleet) as router:
        yield fleet, router


def _debug(router: UvicornThread, body: dict[str, Any]) -> dict[str, Any]:
    resp = HTTP.post(router.url + "/debug/route", json=body, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def test_openai_client_stream_and_non_stream(pair: tuple[SimFleet, UvicornThread]) -> None:
    fleet, router = pair
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    raw = client.completions.with_raw_response.create(model="sim-model", prompt=SYSTEM + "Q1", max_tokens=8)
    assert raw.headers["x-cache-router-backend"] in fleet.urls
    completion = raw.parse()
    assert completion.choices[0].text and completion.usage is not None
    assert completion.usage.prompt_tokens > 100

    pieces = list(client.completions.create(model="sim-model", prompt=SYSTEM + "Q2", max_tokens=8, stream=True))
    assert len([p for p in pieces if p.choices]) >= 2
    assert all(p.usage is None for p in pieces)  # the router's own usage request is stripped

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How many crates?"}]
    chat = client.chat.completions.create(model="sim-model", messages=messages, max_tokens=8)  # type: ignore[arg-type]
    assert chat.choices[0].message.content
    chunks = list(client.chat.completions.create(model="sim-model", messages=messages, max_tokens=8,  # type: ignore[arg-type]
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].prompt_tokens_details is not None
    # Same system prompt, same replica: the engine reports the prefix cached.
    assert (usage[0].prompt_tokens_details.cached_tokens or 0) >= 64

    models = client.models.list()
    assert [m.id for m in models.data] == ["sim-model"]


def test_prediction_matches_engine_cached_tokens_and_debug_route_is_dry(
        pair: tuple[SimFleet, UvicornThread]) -> None:
    fleet, router = pair
    body = {"model": "sim-model", "prompt": SYSTEM + "Unique question 7?", "max_tokens": 4}
    first = HTTP.post(router.url + "/v1/completions", json=body, timeout=10)
    holder = first.headers["x-cache-router-backend"]
    requests_before = sum(fleet.stats(i)["requests"] for i in range(2))

    plan = _debug(router, body)
    assert sum(fleet.stats(i)["requests"] for i in range(2)) == requests_before  # nothing was sent
    by_backend = {r["backend"]: r for r in plan["replicas"]}
    assert set(by_backend) == set(fleet.urls)
    assert plan["pick"]["backend"] == holder and plan["pick"]["reason"] == "affinity"
    assert by_backend[holder]["matched_tokens"] == plan["cacheable_tokens"] > 0
    assert plan["approximate"] is False and plan["index_available"] is True

    cached_before = metric(router.url, "cache_router_engine_cached_tokens_total")
    again = HTTP.post(router.url + "/v1/completions", json=body, timeout=10)
    assert again.headers["x-cache-router-backend"] == holder
    predicted = int(again.headers["x-cache-router-matched-tokens"])
    assert predicted == plan["cacheable_tokens"]
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == predicted
    assert metric(router.url, "cache_router_engine_cached_tokens_total") - cached_before == predicted


def test_stale_hit_after_engine_reset_is_counted_and_the_prompt_stays_credited(
        pair: tuple[SimFleet, UvicornThread]) -> None:
    fleet, router = pair
    body = {"model": "sim-model", "prompt": SYSTEM + "Stale question?", "max_tokens": 4, "stream": True}
    HTTP.post(router.url + "/v1/completions", json=body, timeout=10)
    holder = _debug(router, body)["pick"]["backend"]
    i = fleet.urls.index(holder)
    assert fleet.reset_prefix_cache(i)

    stale_before = metric(router.url, "cache_router_stale_hits_total", backend=holder)
    index_lost_before = metric(router.url, "cache_router_lost_savings_tokens_total", cause="index")
    resp = HTTP.post(router.url + "/v1/completions", json=body, timeout=10)
    assert resp.headers["x-cache-router-backend"] == holder
    predicted = int(resp.headers["x-cache-router-matched-tokens"])
    assert predicted > 0
    assert '"usage":{' not in resp.text  # the router's usage request stays invisible
    _wait(lambda: metric(router.url, "cache_router_stale_hits_total", backend=holder) == stale_before + 1)
    lost = metric(router.url, "cache_router_lost_savings_tokens_total", cause="index") - index_lost_before
    assert lost == predicted  # the engine had nothing left
    # The stale request re-filled the engine's cache with this prompt: the next one is predicted
    # and really hit (dropping the keys here would predict 0 and then hit).
    again = HTTP.post(router.url + "/v1/completions", json={**body, "stream": False}, timeout=10)
    assert again.headers["x-cache-router-backend"] == holder
    cached = again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and int(again.headers["x-cache-router-matched-tokens"]) == cached


def test_engine_restart_clears_its_index_entries() -> None:
    with SimFleet(1, block_size=16) as fleet, _router(fleet) as router:
        body = {"model": "sim-model", "prompt": SYSTEM + "Restart?", "max_tokens": 4}
        HTTP.post(router.url + "/v1/completions", json=body, timeout=10)
        assert _debug(router, body)["replicas"][0]["matched_tokens"] > 0
        time.sleep(0.5)  # let the fleet scrape the engine's counters once before they go back to 0
        fleet.restart(0)
        _wait(lambda: _debug(router, body)["replicas"][0]["matched_tokens"] == 0, timeout=8)


def test_approximate_mode_without_tokenizer_still_keeps_affinity() -> None:
    with SimFleet(2, block_size=16) as fleet, \
            running_router(backends=fleet.urls, scheduling={"metrics_interval_s": 0.2}) as router:
        body = {"model": "sim-model", "prompt": SYSTEM + "Approximate?", "max_tokens": 4}
        first = HTTP.post(router.url + "/v1/completions", json=body, timeout=10)
        plan = _debug(router, body)
        assert plan["approximate"] is True
        assert plan["pick"]["backend"] == first.headers["x-cache-router-backend"]
        assert plan["pick"]["matched_tokens"] > 0
        assert metric(router.url, "cache_router_tokenizer_approximate", model="sim-model") == 1


def _wait(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_precise_mode_events_confirm_route_time_entries() -> None:
    """With KV events, route-time entries live only speculative_ttl_s unless the engine's
    BlockStored confirms them; through the app's wiring they outlive that TTL."""
    with SimFleet(1, block_size=16, kv_events="bind") as fleet:
        spec = fleet[0]
        backend = {"url": spec.url, "kv_events": spec.kv_events, "kv_replay": spec.kv_replay}
        with running_router(backends=[backend], tokenizer=str(SIM_MODEL), block_size=16,
                            index={"speculative_ttl_s": 0.3, "selfcheck": False}) as router:
            time.sleep(0.5)  # the SUB socket joins before the engine publishes (ZMQ slow joiner)
            body = {"model": "sim-model", "prompt": SYSTEM + "Precise?", "max_tokens": 4}
            assert HTTP.post(router.url + "/v1/completions", json=body, timeout=10).status_code == 200
            time.sleep(0.8)  # past the speculative TTL
            plan = _debug(router, body)
            assert plan["replicas"][0]["matched_tokens"] == plan["cacheable_tokens"] > 0
            assert metric(router.url, "cache_router_kv_events_total", type="BlockStored") > 0
            # Precise: the route-time record had the 0.3 s TTL, so only the events kept it alive.
            assert metric(router.url, "cache_router_precise_mode", backend=spec.url) == 1


def test_lora_adapter_is_its_own_namespace_and_experiment_arm_is_labelled() -> None:
    with SimFleet(1, block_size=16, loras=("support-adapter",)) as fleet, \
            _router(fleet, experiment={"baseline_fraction": 1.0, "baseline_policy": "least_load"}) as router:
        decided = metric(router.url, "cache_router_decisions_total", arm="baseline", reason="least_load")
        served = metric(router.url, "cache_router_requests_total", arm="baseline", outcome="ok",
                        model="support-adapter")
        models = {m["id"] for m in HTTP.get(router.url + "/v1/models").json()["data"]}
        assert models == {"sim-model", "support-adapter"}
        base = {"model": "sim-model", "prompt": SYSTEM + "LoRA?", "max_tokens": 2}
        adapter = {**base, "model": "support-adapter"}
        assert HTTP.post(router.url + "/v1/completions", json=base, timeout=10).status_code == 200
        assert _debug(router, base)["replicas"][0]["matched_tokens"] > 0
        assert _debug(router, adapter)["replicas"][0]["matched_tokens"] == 0  # same text, other adapter
        resp = HTTP.post(router.url + "/v1/completions", json=adapter, timeout=10)
        assert resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # the engine agrees
        assert metric(router.url, "cache_router_decisions_total", arm="baseline", reason="least_load") == decided + 2
        assert metric(router.url, "cache_router_requests_total", arm="baseline", outcome="ok",
                      model="support-adapter") == served + 1
