"""Admission through the gateway: at the per-replica cap a request waits in the router's
queue for a slot (held until the stream ends), 429 when the queue is full, 503 past its
deadline, both with Retry-After."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable

import httpx

from tests.support.router import HTTP, metric, running_router, scripted_engines

BODY = {"model": "sim-model", "prompt": "hello there " * 20}


def _post(url: str) -> httpx.Response:
    return HTTP.post(url + "/v1/completions", json=BODY, timeout=10)


def test_queued_request_waits_for_the_slot_then_succeeds() -> None:
    with scripted_engines(1, first_byte_delay_s=0.6) as (engine,), \
            running_router(backends=[engine.url],
                           admission={"max_concurrency_per_backend": 1, "queue_timeout_s": 5}) as router, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        t0 = time.monotonic()
        first = pool.submit(_post, router.url)
        time.sleep(0.2)
        second = pool.submit(_post, router.url)
        assert first.result().status_code == 200
        assert second.result().status_code == 200
        # One slot: the second started only after the first ended (two 0.6 s answers in series).
        assert time.monotonic() - t0 > 1.1
        assert len(engine.requests) == 2


def test_full_queue_is_429_and_deadline_is_503() -> None:
    with scripted_engines(1, first_byte_delay_s=3.0) as (engine,), \
            running_router(backends=[engine.url], admission={"max_concurrency_per_backend": 1,
                                                             "queue_size": 1, "queue_timeout_s": 1.0}) as router, \
            concurrent.futures.ThreadPoolExecutor(3) as pool:
        holder = pool.submit(_post, router.url)
        _wait(lambda: len(engine.requests) == 1)  # the holder has the only slot
        waiter = pool.submit(_post, router.url)
        _wait(lambda: metric(router.url, "cache_router_admission_queue_depth") == 1)  # the waiter is queued
        full = _post(router.url)
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert full.json()["error"]["code"] == "router_queue_full"
        late = waiter.result()  # its 1 s deadline passes while the holder still has 2 s to go
        assert late.status_code == 503 and late.json()["error"]["code"] == "overloaded"
        assert "retry-after" in late.headers
        assert holder.result().status_code == 200
        assert len(engine.requests) == 1


def _wait(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)
