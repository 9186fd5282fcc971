"""Admission control under a burst of streams, against simulated engines that stream slowly.

Per-replica cap: no engine ever runs more than ``max_concurrency_per_backend`` requests
(sampled from the engines' own counters). A slot is held until the stream ends: with a cap
of one, a second request starts only after the first stream's last byte. Past the queue: 429
with Retry-After; past the queue deadline: 503 with Retry-After; everything admitted succeeds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import Any

import httpx

from loadtest.engine import SimFleet
from tests.support.router import running_router

# 20 ms per token: a 30-token stream lasts ~0.6 s.
SLOW = ["--decode-ms", "20", "--prefill-base-ms", "1"]


def _body(i: int, tokens: int = 30) -> dict[str, Any]:
    return {"model": "sim-model", "prompt": f"burst request {i} " * 10, "max_tokens": tokens,
            "ignore_eos": True, "stream": True}


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[int, str | None, float, float]:
    """(status, Retry-After, time of the first byte, time of the last byte)."""
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        first = time.monotonic()
        async for _ in r.aiter_bytes():
            pass
        return r.status_code, r.headers.get("retry-after"), first, time.monotonic()


def _peak_running(fleet: SimFleet, stop: threading.Event, peaks: list[int]) -> None:
    while not stop.is_set():
        for i in range(fleet.n):
            peaks[i] = max(peaks[i], fleet.stats(i)["running"])
        time.sleep(0.01)


def test_burst_respects_the_cap_queues_then_429_and_503_with_retry_after() -> None:
    cap, queue = 2, 4
    with SimFleet(2, block_size=16, zero=False, extra_args=SLOW) as fleet, \
            running_router(backends=fleet.urls, block_size=16, log_decisions=False,
                           admission={"max_concurrency_per_backend": cap, "queue_size": queue,
                                      "queue_timeout_s": 0.9}) as router:
        peaks = [0] * fleet.n
        stop = threading.Event()
        sampler = threading.Thread(target=_peak_running, args=(fleet, stop, peaks), daemon=True)
        sampler.start()

        async def burst() -> list[tuple[int, str | None, float, float]]:
            async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=64)) as client:
                return await asyncio.gather(*(_stream(client, router.url, _body(i)) for i in range(16)))

        try:
            results = asyncio.run(burst())
        finally:
            stop.set()
            sampler.join(5)
        statuses = Counter(r[0] for r in results)
        print(f"\n16 streams, cap {cap} x 2 replicas, queue {queue}: statuses {dict(statuses)}, "
              f"peak running per engine {peaks}")
        assert max(peaks) <= cap and max(peaks) >= 1
        # 4 run at once, 4 wait in the queue; the other 8 find it full.
        assert statuses[200] >= 2 * cap
        assert statuses[429] == 16 - 2 * cap - queue
        # Queued streams wait 0.9 s at most, but the running ones need ~0.6 s: some may get a slot.
        assert statuses[200] + statuses[503] == 2 * cap + queue
        for status, retry_after, *_ in results:
            if status in (429, 503):
                assert retry_after is not None and int(retry_after) >= 1


def test_slot_is_held_until_the_stream_ends() -> None:
    with SimFleet(1, block_size=16, zero=False, extra_args=SLOW) as fleet, \
            running_router(backends=fleet.urls, block_size=16,
                           admission={"max_concurrency_per_backend": 1, "queue_timeout_s": 10}) as router:

        async def two() -> list[tuple[int, str | None, float, float]]:
            async with httpx.AsyncClient(timeout=20) as client:
                first = asyncio.create_task(_stream(client, router.url, _body(1)))
                await asyncio.sleep(0.2)  # the first is streaming now
                second = asyncio.create_task(_stream(client, router.url, _body(2, tokens=2)))
                return [await first, await second]

        (s1, _, _, end1), (s2, _, first2, _) = asyncio.run(two())
        print(f"\ncap 1: second request's first byte {first2 - end1:+.3f}s after the first stream's last byte")
        assert s1 == s2 == 200
        assert first2 >= end1 - 0.02  # it waited for the whole first stream, not just its first byte
