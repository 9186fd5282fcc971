"""A client that closes its connection right after ``[DONE]`` (the sync ``openai`` client does)
got its whole answer: every such stream is counted ok and fed back (cached tokens), none lost."""

from __future__ import annotations

import time

import openai

from loadtest.engine import SimFleet
from tests.conftest import SIM_MODEL
from tests.support.router import metric, running_router

STREAMS = 20


def test_streams_closed_right_after_done_are_all_fed_back() -> None:
    with SimFleet(1) as fleet, running_router(backends=fleet.urls, tokenizer=str(SIM_MODEL)) as router:
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=30)
        backend = fleet.urls[0]
        ok_before = metric(router.url, "cache_router_requests_total", backend=backend, model="sim-model",
                           arm="main", outcome="ok")
        cached_before = metric(router.url, "cache_router_engine_cached_tokens_total", model="sim-model", arm="main")
        prompt = "the same long system prompt for every stream " * 20
        for i in range(STREAMS):
            chunks = list(client.completions.create(model="sim-model", prompt=prompt + f"question {i}",
                                                    max_tokens=3, stream=True))
            assert chunks, "no chunk arrived"
        deadline = time.monotonic() + 5
        while metric(router.url, "cache_router_requests_total", backend=backend, model="sim-model", arm="main",
                     outcome="ok") - ok_before < STREAMS:
            assert time.monotonic() < deadline, "some streams were never finished by the router"
            time.sleep(0.05)
        assert metric(router.url, "cache_router_engine_cached_tokens_total", model="sim-model",
                      arm="main") > cached_before  # the usage the router asked for was read every time
        client.close()
