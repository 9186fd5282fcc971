"""Two cache-router instances sharing one real redis-server, in front of simulated engines.

Both routers are the real app (``router.app.create_app``) on real uvicorn; the engines are
``loadtest.engine.SimFleet``. Figures (balance, hit rate, failures) are printed with ``-s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from loadtest.engine import SimFleet
from tests.conftest import SIM_MODEL
from tests.support.router import ADMIN, running_router
from tests.support.servers import RedisServer, UvicornThread

# A loaded 2-core CI box can take tens of ms to schedule a lookup: these tests are about sharing,
# not the deadline (test_redis_faults covers that), so they give the index room.
DEADLINE_MS = 200.0
WHY: Counter[str] = Counter()  # why requests failed, printed by the tests that count failures
GROUPS = [
    f"Group {g} shares this system prompt about warehouse {g} and its shipping rules. " * 8 for g in range(12)
]


def _router(fleet: SimFleet, redis_url: str, namespace: str, **index: Any) -> Any:
    return running_router(
        backends=fleet.urls,
        tokenizer=str(SIM_MODEL),
        block_size=16,
        redis_url=redis_url,
        index={"namespace": namespace, "deadline_ms": DEADLINE_MS, **index},
        scheduling={"metrics_interval_s": 0.2},
    )


@contextlib.contextmanager
def two_routers(
    fleet: SimFleet, redis_url: str, namespace: str
) -> Iterator[tuple[UvicornThread, UvicornThread]]:
    with _router(fleet, redis_url, namespace) as a, _router(fleet, redis_url, namespace) as b:
        yield a, b


def _matched_via(url: str, prompt: str, within_s: float = 5.0) -> int:
    """Poll a router's /debug/route (a dry run) until it credits some replica with the prompt's prefix."""
    body = {"model": "sim-model", "prompt": prompt, "max_tokens": 2}
    t_end = time.monotonic() + within_s
    while True:
        plan = httpx.post(url + "/debug/route", json=body, timeout=10, headers=ADMIN).json()
        best = max((r["matched_tokens"] for r in plan["replicas"]), default=0)
        if best > 0 or time.monotonic() > t_end:
            return int(best)
        time.sleep(0.05)


def _complete(url: str, prompt: str) -> httpx.Response:
    body = {"model": "sim-model", "prompt": prompt, "max_tokens": 2}
    return httpx.post(url + "/v1/completions", json=body, timeout=20)


async def _load(
    urls: list[str], n: int, concurrency: int, stop: threading.Event | None = None, seed: int = 1
) -> tuple[Counter[str], int, int, int]:
    """Up to n requests (fewer if ``stop`` is set) over the routers, prompts from GROUPS with a
    unique tail. Returns (requests per backend, failed, cached tokens, prompt tokens)."""
    rng = random.Random(seed)
    per_backend: Counter[str] = Counter()
    failed = cached = prompt = sent = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failed, cached, prompt, sent
        while sent < n and not (stop is not None and stop.is_set()):
            i, sent = sent, sent + 1
            body = {"model": "sim-model", "prompt": rng.choice(GROUPS) + f"question {i}?", "max_tokens": 2}
            try:
                r = await client.post(urls[i % len(urls)] + "/v1/completions", json=body, timeout=20)
            except httpx.HTTPError as exc:
                failed += 1
                WHY[type(exc).__name__] += 1
                continue
            if r.status_code != 200:
                failed += 1
                WHY[f"{r.status_code} {r.text[:120]}"] += 1
                continue
            per_backend[r.headers["x-cache-router-backend"]] += 1
            usage = r.json()["usage"]
            prompt += usage["prompt_tokens"]
            cached += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0

    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return per_backend, failed, cached, prompt


@pytest.fixture(scope="module")
def fleet() -> Iterator[SimFleet]:
    with SimFleet(4, block_size=16, cache_blocks=2048) as f:
        yield f


def test_a_prefix_routed_by_one_router_is_found_by_the_other(
    fleet: SimFleet, redis_server: RedisServer, namespace: str
) -> None:
    with two_routers(fleet, redis_server.url, namespace) as (a, b):
        first = _complete(a.url, GROUPS[0] + "What ships on Monday?")
        assert first.status_code == 200, first.text
        holder = first.headers["x-cache-router-backend"]
        # router A records after dispatch, off the request path; B can only learn it from Redis
        assert _matched_via(b.url, GROUPS[0] + "And on Tuesday?") >= 16 * 8
        second = _complete(b.url, GROUPS[0] + "And on Tuesday?")
        assert second.headers["x-cache-router-backend"] == holder
        # B never saw the prefix: it can only know from Redis
        assert int(second.headers["x-cache-router-matched-tokens"]) >= 16 * 8


def test_a_new_router_on_a_warm_redis_routes_warm_from_its_first_request(
    fleet: SimFleet, redis_server: RedisServer, namespace: str
) -> None:
    with _router(fleet, redis_server.url, namespace) as a:
        holder = _complete(a.url, GROUPS[1] + "Opening hours?").headers["x-cache-router-backend"]
        assert _matched_via(a.url, GROUPS[1] + "Closing hours?") > 0  # A's record landed in Redis
    with _router(fleet, redis_server.url, namespace) as fresh:
        r = _complete(fresh.url, GROUPS[1] + "Closing hours?")
        assert r.headers["x-cache-router-backend"] == holder
        assert int(r.headers["x-cache-router-matched-tokens"]) > 0


def test_two_routers_under_load_stay_balanced_and_hit(
    fleet: SimFleet, redis_server: RedisServer, namespace: str
) -> None:
    with two_routers(fleet, redis_server.url, namespace) as (a, b):
        per_backend, failed, cached, prompt = asyncio.run(_load([a.url, b.url], n=240, concurrency=16))
    counts = [per_backend.get(u, 0) for u in fleet.urls]
    mean = sum(counts) / len(counts)
    ratio = max(counts) / mean
    print(
        f"\ntwo routers, 240 requests, 12 prefixes: per replica {counts}, max/mean {ratio:.2f}, "
        f"hit rate {cached / prompt:.2f}, failed {failed} {dict(WHY)}"
    )
    assert failed == 0
    assert min(counts) > 0 and ratio < 2.0
    assert cached / prompt > 0.5  # 12 shared prefixes over 240 requests: most prompt tokens are cached


@pytest.mark.parametrize("fault", ["kill", "pause", "restart"])
def test_redis_faults_during_load_fail_no_request(fleet: SimFleet, namespace: str, fault: str) -> None:
    server = RedisServer().start()
    try:
        with two_routers(fleet, server.url, namespace) as (a, b):
            urls = [a.url, b.url]
            asyncio.run(_load(urls, n=40, concurrency=8, seed=2))  # warm
            result: dict[str, Any] = {}
            stop = threading.Event()

            def load() -> None:  # runs until the fault is over, bounded by 3000 requests
                result["out"] = asyncio.run(_load(urls, n=3000, concurrency=8, stop=stop, seed=3))

            worker = threading.Thread(target=load, name="load")
            worker.start()
            time.sleep(0.3)
            if fault == "kill":
                server.kill()
                time.sleep(1.0)
                server.start()  # comes back empty
            elif fault == "pause":
                server.pause()
                time.sleep(2.0)
                server.resume()
            else:
                server.restart()
            time.sleep(0.5)  # and a little load after it
            # the fault happened while the load was running (else this test proves nothing)
            assert worker.is_alive(), "load ended before the fault: raise n"
            stop.set()
            worker.join(60)
            assert not worker.is_alive()
            per_backend, failed, _, _ = result["out"]
            print(
                f"\nredis {fault} during load through two routers: sent {sum(per_backend.values()) + failed}, "
                f"failed {failed}"
            )
            assert failed == 0
            # routing recovers by itself: a new prefix through A is found by B
            t0 = time.monotonic()
            while True:
                prompt = GROUPS[5] + f"recovery check {time.monotonic()}"
                holder = _complete(a.url, prompt).headers["x-cache-router-backend"]
                _matched_via(b.url, prompt + " again", within_s=0.5)
                r = _complete(b.url, prompt + " again")
                if (
                    int(r.headers["x-cache-router-matched-tokens"]) > 0
                    and r.headers["x-cache-router-backend"] == holder
                ):
                    break
                assert time.monotonic() - t0 < 5.0, "index did not recover within 5 s"
            print(
                f"redis {fault}: shared index working again {time.monotonic() - t0:.2f}s after the load ended"
            )
    finally:
        server.stop()
