"""Proxy behaviour through a real router to real (scripted) upstreams on loopback:
streaming pass-through, retries before the first byte only, broken streams, disconnects,
timeouts, response headers, the usage chunk."""

from __future__ import annotations

import itertools
import time

import httpx
import orjson
import pytest

from tests.support.router import HTTP, metric, running_router, scripted_engines

CLIENTS = pytest.mark.parametrize("client", ["h1", "aiohttp", "httpx"])  # every UpstreamClient implementation
SERVERS = pytest.mark.parametrize("server", ["hot", "asgi"])  # router.api.hot, and the app's ASGI path
PROMPT = "The quick brown fox jumps over the lazy dog. " * 20


def _events(text: str) -> list[str]:
    return [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]


@CLIENTS
@SERVERS
def test_stream_arrives_incrementally_with_headers(client: str, server: str) -> None:
    with scripted_engines(1, chunks=5, chunk_interval_s=0.15) as (engine,), \
            running_router(proxy={"client": client}, backends=[engine.url], server=server) as router:
        arrivals: list[float] = []
        t0 = time.monotonic()
        with HTTP.stream("POST", router.url + "/v1/completions", timeout=10,
                          json={"model": "sim-model", "prompt": PROMPT, "stream": True}) as resp:
            assert resp.status_code == 200
            assert resp.headers["x-cache-router-backend"] == engine.url
            assert int(resp.headers["x-cache-router-matched-tokens"]) >= 0
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.monotonic() - t0)
        # 5 chunks + [DONE], each passed on as it came: spread over the upstream's ~0.6 s,
        # the first long before the last (a buffering proxy would deliver them together).
        assert len(arrivals) == 6
        assert arrivals[-1] - arrivals[0] > 0.45
        gaps = [b - a for a, b in itertools.pairwise(arrivals[:5])]
        assert sum(g > 0.03 for g in gaps) >= 3, gaps  # tolerant of one late wake-up on a busy CI box


@SERVERS
def test_non_streaming_headers_and_body(server: str) -> None:
    with scripted_engines(1) as (engine,), running_router(backends=[engine.url], server=server) as router:
        resp = HTTP.post(router.url + "/v1/chat/completions", timeout=10,
                          json={"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 200
        assert resp.headers["x-cache-router-backend"] == engine.url
        assert resp.headers["x-cache-router-matched-tokens"] == "0"
        assert resp.json()["choices"][0]["message"]["content"] == "xxxxx"


@CLIENTS
def test_5xx_is_retried_on_another_replica_before_the_first_byte(client: str) -> None:
    with scripted_engines(2) as (bad, good), \
            running_router(proxy={"client": client}, backends=[bad.url, good.url]) as router:
        bad.script.mode = "status"
        before = metric(router.url, "cache_router_retries_total", reason="status")
        for i in range(6):
            resp = HTTP.post(router.url + "/v1/completions", timeout=10,
                              json={"model": "sim-model", "prompt": f"{i} {PROMPT}", "stream": i % 2 == 0})
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-cache-router-backend"] == good.url
        assert len(good.requests) == 6
        assert metric(router.url, "cache_router_retries_total", reason="status") - before == len(bad.requests)


def test_connect_error_is_retried_on_another_replica() -> None:
    with scripted_engines(2) as (dead, good), \
            running_router(backends=[dead.url, good.url], health={"interval_s": 30}) as router:
        dead.stop()  # still "healthy" to the fleet until its next probe, 30 s away
        before = metric(router.url, "cache_router_retries_total", reason="connect")
        for i in range(4):
            resp = HTTP.post(router.url + "/v1/completions", timeout=10,
                              json={"model": "sim-model", "prompt": f"{i} {PROMPT}", "stream": i % 2 == 1})
            assert resp.status_code == 200 and resp.headers["x-cache-router-backend"] == good.url
        assert metric(router.url, "cache_router_retries_total", reason="connect") > before


@CLIENTS
@SERVERS
def test_broken_stream_ends_with_sse_error_and_is_not_retried(client: str, server: str) -> None:
    with scripted_engines(2, mode="die") as engines, \
            running_router(proxy={"client": client}, backends=[e.url for e in engines], server=server) as router:
        resp = HTTP.post(router.url + "/v1/completions", timeout=10,
                          json={"model": "sim-model", "prompt": PROMPT, "stream": True})
        assert resp.status_code == 200
        events = _events(resp.text)
        assert events[-1] == "[DONE]"
        assert orjson.loads(events[-2])["error"]["code"] == "stream_broken"
        assert [orjson.loads(e)["choices"][0]["text"] for e in events[:2]] == ["t0", "t1"]
        # Half an answer reached the client: nothing may be re-sent, so exactly one attempt.
        assert sum(len(e.requests) for e in engines) == 1


@CLIENTS
def test_first_byte_timeout_retries_then_504(client: str) -> None:
    with scripted_engines(2, first_byte_delay_s=3.0) as engines, \
            running_router(proxy={"client": client}, backends=[e.url for e in engines], timeouts={"first_byte_s": 0.3},
                           health={"interval_s": 0.2, "max_retries": 1, "breaker_failures": 50}) as router:
        t0 = time.monotonic()
        resp = HTTP.post(router.url + "/v1/completions", timeout=10, json={"model": "sim-model", "prompt": PROMPT})
        assert resp.status_code == 504
        assert resp.json()["error"]["code"] == "upstream_timeout"
        assert time.monotonic() - t0 < 2.0
        assert [len(e.requests) for e in engines] == [1, 1]


@CLIENTS
@SERVERS
def test_client_disconnect_mid_stream_cancels_upstream(client: str, server: str) -> None:
    with scripted_engines(1, mode="endless", chunk_interval_s=0.05) as (engine,), \
            running_router(proxy={"client": client}, backends=[engine.url], server=server) as router:
        with HTTP.stream("POST", router.url + "/v1/completions", timeout=10,
                          json={"model": "sim-model", "prompt": PROMPT, "stream": True}) as resp:
            for i, _ in enumerate(resp.iter_lines()):
                if i >= 3:
                    break
        _wait_for(lambda: engine.disconnects == 1, "upstream never saw the disconnect")
        _wait_for(lambda: metric(router.url, "cache_router_in_flight", backend=engine.url) == 0,
                  "in-flight slot not released")
        assert engine.finished == 0


@SERVERS
def test_client_disconnect_before_first_byte_cancels_upstream(server: str) -> None:
    with scripted_engines(1, first_byte_delay_s=5.0) as (engine,), \
            running_router(backends=[engine.url], server=server) as router:
        with pytest.raises(httpx.ReadTimeout):
            HTTP.post(router.url + "/v1/completions", timeout=httpx.Timeout(5, read=0.4),
                       json={"model": "sim-model", "prompt": PROMPT, "stream": True})
        _wait_for(lambda: engine.disconnects == 1, "upstream never saw the disconnect")
        assert metric(router.url, "cache_router_requests_total", outcome="cancelled") >= 1


@pytest.mark.parametrize("client_asks", [False, True])
def test_usage_chunk_is_requested_upstream_and_stripped_unless_asked(client_asks: bool) -> None:
    with scripted_engines(1, cached_tokens=0) as (engine,), running_router(backends=[engine.url]) as router:
        body: dict[str, object] = {"model": "sim-model", "prompt": PROMPT, "stream": True}
        if client_asks:
            body["stream_options"] = {"include_usage": True}
        resp = HTTP.post(router.url + "/v1/completions", timeout=10, json=body)
        events = _events(resp.text)
        assert engine.requests[0]["stream_options"] == {"include_usage": True}
        with_usage = [e for e in events if e != "[DONE]" and "usage" in orjson.loads(e)]
        assert len(with_usage) == (1 if client_asks else 0)
        assert events[-1] == "[DONE]" and len(events) == 5 + 1 + len(with_usage)


@SERVERS
def test_no_healthy_replica_is_503_with_retry_after(server: str) -> None:
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    with running_router(backends=[{"url": dead, "models": ["sim-model"]}], wait_ready=False, server=server) as router:
        assert HTTP.get(router.url + "/ready").status_code == 503
        resp = HTTP.post(router.url + "/v1/completions", json={"model": "sim-model", "prompt": "hi"})
        assert resp.status_code == 503
        assert int(resp.headers["retry-after"]) >= 1
        assert resp.json()["error"]["type"] == "service_unavailable"
        assert HTTP.get(router.url + "/health").status_code == 200


def _wait_for(cond: object, message: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(message)


def test_idle_stream_is_cut_with_an_sse_error() -> None:
    with scripted_engines(1, chunks=3, chunk_interval_s=1.5) as (engine,), \
            running_router(backends=[engine.url], timeouts={"idle_s": 0.3}) as router:
        t0 = time.monotonic()
        resp = HTTP.post(router.url + "/v1/completions", timeout=10,
                          json={"model": "sim-model", "prompt": PROMPT, "stream": True})
        events = _events(resp.text)
        assert time.monotonic() - t0 < 1.4  # cut at the idle deadline, not after the slow chunk
        assert orjson.loads(events[-2])["error"]["code"] == "stream_broken" and events[-1] == "[DONE]"
        _wait_for(lambda: engine.disconnects == 1, "upstream not closed after the idle timeout")


def test_one_decision_log_line_per_request_without_prompt(caplog: pytest.LogCaptureFixture) -> None:
    secret = "zebra quartz marmalade " * 10
    with scripted_engines(1) as (engine,), running_router(backends=[engine.url]) as router:
        caplog.set_level("INFO", logger="cache_router.decision")
        for stream in (False, True):
            HTTP.post(router.url + "/v1/completions", timeout=10,
                       json={"model": "sim-model", "prompt": secret, "stream": stream})
        _wait_for(lambda: len([r for r in caplog.records if r.name == "cache_router.decision"]) == 2, "no log")
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "cache_router.decision"]
    assert [line["backend"] for line in lines] == [engine.url, engine.url]
    assert all(line["outcome"] == "ok" and line["status"] == 200 and line["prompt_tokens"] > 0 for line in lines)
    assert "zebra" not in caplog.text
