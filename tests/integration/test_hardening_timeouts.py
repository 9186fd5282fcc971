"""The four upstream timeouts, each on its own, through the real router and both HTTP clients.

connect: a replica whose listen backlog is full (SYNs dropped, the connect hangs) costs one
``connect_s`` and the request is retried on another replica. first byte and idle are
covered in test_gateway_proxy (scripted engines) and test_faults_replicas (a hung simulated
engine); total: a stream that keeps trickling past ``total_s`` is cut with an SSE error event.
Defaults stay long, as LLM traffic needs.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from router.config import TimeoutsConfig
from tests.support.router import running_router, scripted_engines


def test_defaults_suit_llm_traffic() -> None:
    t = TimeoutsConfig()
    assert t.connect_s <= 10 and t.first_byte_s >= 60 and t.idle_s >= 60 and t.total_s >= 600


@contextlib.contextmanager
def tarpit(port: int) -> Iterator[None]:
    """A socket on ``port`` that never accepts, its backlog filled: new connects hang (SYN dropped)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(0)
    fillers: list[socket.socket] = []
    try:
        for _ in range(4):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.1)
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
            pytest.skip("this kernel accepts connections past a full backlog: no hanging connect here")
        except TimeoutError:
            pass
        finally:
            probe.close()
        yield
    finally:
        for s in fillers:
            s.close()
        server.close()


@pytest.mark.parametrize("client", ["h1", "aiohttp", "httpx"])
def test_connect_timeout_is_retried_on_another_replica(client: str) -> None:
    with scripted_engines(2) as (good, doomed):
        health = {"interval_s": 60.0, "timeout_s": 0.5}  # no probe in between: only the request sees it
        with running_router(backends=[good.url, doomed.url], health=health, proxy={"client": client},
                            timeouts={"connect_s": 0.3}) as router:
            port = doomed.server.port if doomed.server else 0
            doomed.stop()
            with tarpit(port):
                took, backends = [], set()
                for i in range(4):  # equal replicas take turns: some requests pick the tarpit first
                    t0 = time.monotonic()
                    r = httpx.post(router.url + "/v1/completions", timeout=10,
                                   json={"model": "sim-model", "prompt": f"hello {i} " * 10, "max_tokens": 1})
                    took.append(time.monotonic() - t0)
                    assert r.status_code == 200, r.text
                    backends.add(r.headers["x-cache-router-backend"])
            print(f"\nconnect timeout ({client}): latencies {[round(x, 2) for x in took]}")
            assert backends == {good.url}
            assert max(took) < 2.0  # one 0.3 s connect timeout, never the kernel's SYN retries
            assert max(took) >= 0.3  # at least one request met the tarpit and was retried


def test_total_timeout_cuts_a_trickling_stream_with_an_sse_error() -> None:
    with scripted_engines(1, mode="endless", chunk_interval_s=0.05) as (engine,), \
            running_router(backends=[engine.url], timeouts={"total_s": 1.0, "idle_s": 10.0}) as router:
        t0 = time.monotonic()
        events: list[str] = []
        body = {"model": "sim-model", "prompt": "go on forever", "stream": True}
        with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=10) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        took = time.monotonic() - t0
        print(f"\ntotal timeout 1 s: stream cut after {took:.2f}s, {len(events)} events")
        assert 0.9 <= took < 3.0
        assert events[-1] == "[DONE]" and '"error"' in events[-2]
        assert len(events) > 5  # it streamed until the deadline
        deadline = time.monotonic() + 3
        while engine.disconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.disconnects == 1  # the upstream request was closed, not left running
