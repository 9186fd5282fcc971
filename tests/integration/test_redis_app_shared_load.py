"""Two router processes' worth of apps on one Redis see each other's in-flight requests: a
stream held open through router A shows up in router B's view of that replica's load."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from loadtest.engine import SimFleet
from tests.support.router import ADMIN, running_router
from tests.support.servers import RedisServer


def _in_flight(router_url: str, backend: str) -> int:
    plan = httpx.post(router_url + "/debug/route", json={"model": "sim-model", "prompt": "probe " * 40},
                      timeout=5, headers=ADMIN).json()
    return int(next(r for r in plan["replicas"] if r["backend"] == backend)["in_flight"])


def test_routers_share_in_flight_counts(redis_server: RedisServer, namespace: str) -> None:
    # A slow decode keeps the streams open long enough to be seen from the other router.
    with SimFleet(1, zero=False, extra_args=["--decode-ms", "150"]) as fleet, \
            running_router(backends=fleet.urls, redis_url=redis_server.url, index={"namespace": namespace}) as a, \
            running_router(backends=fleet.urls, redis_url=redis_server.url, index={"namespace": namespace}) as b:
        backend = fleet.urls[0]
        assert _in_flight(b.url, backend) == 0
        done: list[Any] = []

        def stream() -> None:
            body = {"model": "sim-model", "prompt": "hold " * 40, "max_tokens": 20, "stream": True}
            with httpx.stream("POST", a.url + "/v1/completions", json=body, timeout=30) as r:
                done.append(sum(1 for _ in r.iter_lines()))

        threads = [threading.Thread(target=stream) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        seen = 0
        while time.monotonic() < deadline and seen < 3:
            seen = max(seen, _in_flight(b.url, backend))
            time.sleep(0.1)
        for t in threads:
            t.join(30)
        assert seen == 3, f"router B saw {seen} of router A's 3 in-flight streams"
        assert len(done) == 3
