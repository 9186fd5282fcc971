"""The simulated engine over real HTTP: the openai client, metrics, models, bad input, faults, restart."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.engine import SimFleet

SYSTEM = "You are a careful assistant who answers questions about caching, routing and queues. " * 4


@pytest.fixture(scope="module")
def fleet() -> Iterator[SimFleet]:
    with SimFleet(2, block_size=16, cache_blocks=512, loras=("ad1",)) as f:
        yield f


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=10) as client:
        yield client


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=url + "/v1", api_key="none", http_client=httpx.Client(trust_env=False), max_retries=0
    )


def metrics(http: httpx.Client, url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(http.get(url + "/metrics").text):
        for s in family.samples:
            out[s.name] = s.value
    return out


def test_openai_client_completions_stream_and_not(fleet: SimFleet) -> None:
    client = client_for(fleet.urls[0])
    prompt = SYSTEM + "Why do prefix caches help?"
    first = client.completions.create(model="sim-model", prompt=prompt, max_tokens=12)
    assert first.usage is not None and first.usage.completion_tokens == 12
    assert first.choices[0].finish_reason == "length" and first.choices[0].text
    again = client.completions.create(model="sim-model", prompt=prompt, max_tokens=12)
    assert again.choices[0].text == first.choices[0].text  # replies are reproducible
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert (
        cached == (first.usage.prompt_tokens - 1) // 16 * 16
    )  # all full blocks but the recomputed last token

    chunks = list(
        client.completions.create(
            model="sim-model",
            prompt=prompt,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == first.choices[0].text
    assert len([c for c in chunks if c.choices]) == 12
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens_details is not None
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached


def test_openai_client_chat_stream_and_not(fleet: SimFleet) -> None:
    client = client_for(fleet.urls[1])
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a KV block?"}]
    reply = client.chat.completions.create(model="sim-model", messages=messages, max_tokens=40)  # type: ignore[arg-type]
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    stream = client.chat.completions.create(
        model="sim-model",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == reply.choices[0].message.content
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens > 0
    # Without include_usage no chunk carries usage.
    plain = list(
        client.chat.completions.create(model="sim-model", messages=messages, max_tokens=3, stream=True)
    )  # type: ignore[arg-type]
    assert all(c.usage is None for c in plain)
    # A follow-up turn that appends the reply hits the blocks its generated tokens filled.
    follow = [*messages, {"role": "assistant", "content": reply.choices[0].message.content}]
    follow.append({"role": "user", "content": "And then?"})
    again = client.chat.completions.create(model="sim-model", messages=follow, max_tokens=2)  # type: ignore[arg-type]
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    # The engine computed the prompt and 39 of the 40 reply tokens: every full block of those hits.
    prompt_tokens = reply.usage.prompt_tokens  # type: ignore[union-attr]
    assert again.usage.prompt_tokens_details.cached_tokens == (prompt_tokens + 39) // 16 * 16


def test_token_id_prompts_salt_and_lora(fleet: SimFleet, http: httpx.Client) -> None:
    url = fleet.urls[0] + "/v1/completions"
    prompt = list(range(100, 150))

    def cached(**extra: object) -> int:
        body = http.post(url, json={"prompt": prompt, "max_tokens": 1, **extra}).raise_for_status().json()
        assert body["usage"]["prompt_tokens"] == 50
        return int(body["usage"]["prompt_tokens_details"]["cached_tokens"])

    assert cached(model="sim-model") == 0
    assert cached(model="sim-model") == 48
    assert cached(model="sim-model", cache_salt="tenant-a") == 0
    assert cached(model="sim-model", cache_salt="tenant-a") == 48
    assert cached(model="ad1") == 0
    assert cached(model="ad1") == 48


def test_models_health_and_metrics(fleet: SimFleet, http: httpx.Client) -> None:
    url = fleet.urls[1]
    models = http.get(url + "/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [("sim-model", None), ("ad1", "sim-model")]
    assert http.get(url + "/health").status_code == 200
    before = metrics(http, url)
    body = {"prompt": list(range(1, 70)), "max_tokens": 2}
    http.post(url + "/v1/completions", json=body).raise_for_status()
    http.post(url + "/v1/completions", json=body).raise_for_status()
    after = metrics(http, url)
    assert after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"] == 138
    assert after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"] == 64
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    text = http.get(url + "/metrics").text
    assert 'vllm:cache_config_info{block_size="16",enable_prefix_caching="True",num_gpu_blocks="512"' in text
    assert 'vllm:kv_cache_usage_perc{engine="0",model_name="sim-model"} 0.0' in text


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/completions", b"{not json", 400),
        ("/v1/completions", b"[1, 2]", 400),
        ("/v1/completions", b'{"prompt": 5}', 400),
        ("/v1/completions", b'{"prompt": []}', 400),
        ("/v1/completions", b'{"prompt": [1, 99999]}', 400),
        ("/v1/completions", b'{"prompt": [1, -1]}', 400),
        ("/v1/completions", b'{"prompt": "hi", "max_tokens": 0}', 400),
        ("/v1/completions", b'{"prompt": "hi", "max_tokens": "3"}', 400),
        ("/v1/completions", b'{"prompt": "hi", "max_tokens": 99999999}', 400),
        ("/v1/completions", b'{"prompt": "hi", "stream": "yes"}', 400),
        ("/v1/completions", b'{"prompt": "hi", "cache_salt": 7}', 400),
        ("/v1/completions", b'{"prompt": "hi", "stream_options": {"include_usage": true}}', 400),
        ("/v1/completions", b'{"prompt": "hi", "model": "nope"}', 404),
        ("/v1/chat/completions", b'{"messages": []}', 400),
        ("/v1/chat/completions", b'{"messages": [{"content": "no role"}]}', 400),
        ("/v1/chat/completions", b'{"messages": "hello"}', 400),
        ("/sim/faults", b'{"nonsense": 1}', 400),
        ("/sim/faults", b'{"error_rate": 3}', 400),
    ],
)
def test_bad_input_gets_openai_4xx(
    fleet: SimFleet, http: httpx.Client, path: str, body: bytes, status: int
) -> None:
    r = http.post(fleet.urls[0] + path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["type"] and error["code"] == status


def test_faults_and_restart() -> None:
    with SimFleet(1, cache_blocks=64) as fleet, httpx.Client(trust_env=False, timeout=5) as http:
        url = fleet.urls[0]
        body = {"prompt": list(range(40)), "max_tokens": 6}
        fleet.set_faults(0, error_rate=1.0, error_status=503)
        r = http.post(url + "/v1/completions", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == 503
        fleet.set_faults(0, error_rate=0.0, die_after_tokens=2)
        with pytest.raises(httpx.RemoteProtocolError):
            http.post(url + "/v1/completions", json={**body, "stream": True}).read()
        fleet.set_faults(0, die_after_tokens=None, stall_after_tokens=2)
        lines = []
        with (
            pytest.raises(httpx.ReadTimeout),
            http.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=0.5) as r,
        ):
            for line in r.iter_lines():
                lines.append(line)
        assert len([x for x in lines if x.startswith("data: {")]) == 2
        fleet.set_faults(0, stall_after_tokens=None, hang=True)
        with pytest.raises(httpx.ReadTimeout):
            http.post(url + "/v1/completions", json=body, timeout=0.3)
        fleet.set_faults(0, hang=False, health_fail=True)
        assert http.get(url + "/health").status_code == 503
        fleet.set_faults(0, health_fail=False, health_delay_s=0.3)
        with pytest.raises(httpx.ReadTimeout):
            http.get(url + "/health", timeout=0.1)
        fleet.set_faults(0, health_delay_s=0)
        assert http.post(url + "/v1/completions", json=body).status_code == 200
        assert len(fleet.cache(0)) > 0
        start = metrics(http, url)["process_start_time_seconds"]
        fleet.restart(0)
        assert fleet.cache(0) == {}
        after = metrics(http, url)
        assert after["process_start_time_seconds"] > start
        assert after["vllm:prefix_cache_queries_total"] == 0
        assert fleet.stats(0)["event_seq"] is None  # no events configured
        fleet.restart(0, downtime_s=0.5)
        assert http.get(url + "/health").status_code == 503
        assert http.post(url + "/v1/completions", json=body).status_code == 503


def test_process_mode_fleet_serves_and_dies() -> None:
    with SimFleet(2, mode="process") as fleet, httpx.Client(trust_env=False, timeout=5) as http:
        for url in fleet.urls:
            assert (
                http.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 2}).status_code
                == 200
            )
        fleet.kill()
        with pytest.raises(httpx.ConnectError):
            http.get(fleet.urls[0] + "/health")


def test_a_miss_costs_prefill_time_a_hit_does_not() -> None:
    # 0.05 ms per uncached token: a 1500-token miss takes ~75 ms of prefill, a hit ~1 ms.
    timing = ["--prefill-ms-per-token", "0.05", "--prefill-base-ms", "1", "--decode-ms", "1"]
    with (
        SimFleet(1, zero=False, extra_args=timing) as fleet,
        httpx.Client(trust_env=False, timeout=10) as http,
    ):
        url = fleet.urls[0] + "/v1/completions"

        def ttft(prompt: list[int]) -> float:
            t0 = time.monotonic()
            with http.stream("POST", url, json={"prompt": prompt, "max_tokens": 4, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        return time.monotonic() - t0
            raise AssertionError("no token arrived")

        prompt = list(range(10, 1510))
        miss = ttft(prompt)
        hit = ttft(prompt)
        assert miss >= 0.07
        assert hit < miss - 0.04
        assert fleet.stats(0)["prefill_seconds"] >= 0.075


def test_a_client_that_goes_away_frees_its_slot_and_blocks() -> None:
    timing = ["--decode-ms", "20", "--decode-ms-per-seq", "0"]
    with (
        SimFleet(1, zero=False, extra_args=timing) as fleet,
        httpx.Client(trust_env=False, timeout=10) as http,
    ):
        url = fleet.urls[0]
        body = {"prompt": list(range(10, 100)), "max_tokens": 200, "stream": True}  # 4 s if left to finish
        with http.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()  # held: dropping the iterator would close the response at once
            for line in lines:
                if line.startswith("data: {"):
                    break
            assert metrics(http, url)["vllm:num_requests_running"] == 1
            assert metrics(http, url)["vllm:kv_cache_usage_perc"] > 0
        deadline = time.monotonic() + 2
        while fleet.stats(0)["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = fleet.stats(0)
        assert stats["running"] == 0 and stats["kv_cache_usage"] == 0
        assert stats["generation_tokens"] < 100  # stopped early, not run to the end
        assert all(b["ref_cnt"] == 0 for b in fleet.cache(0).values())
