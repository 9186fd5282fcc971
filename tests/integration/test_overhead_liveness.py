"""The liveness listener (``health_port``): a real helper process and sockets, a real event
loop in a thread.

It answers 200 while the loop runs, even while the loop is busy, 503 once the loop has been
blocked longer than ``stall_s``, and 200 again when it recovers; its helper never outlives
a router killed with SIGKILL; the router's lifespan starts it and stops it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from loadtest.engine import SimFleet
from router.liveness import LivenessListener
from tests.support.router import running_router
from tests.support.servers import free_port


@pytest.fixture
def loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _get(port: int, path: str = "/health") -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2)


def test_answers_while_the_loop_runs_and_503_when_it_stalls(loop_thread: asyncio.AbstractEventLoop) -> None:
    listener = LivenessListener("127.0.0.1", 0, stall_s=0.5)
    asyncio.run_coroutine_threadsafe(listener.start(), loop_thread).result(5)
    try:
        ok = _get(listener.port)
        assert ok.status_code == 200 and ok.json() == {"status": "ok"}
        assert _get(listener.port, "/metrics").status_code == 404

        # Block the loop (as a blocking call inside a coroutine would) for 1.5 s.
        loop_thread.call_soon_threadsafe(time.sleep, 1.5)
        time.sleep(0.05)
        t0 = time.perf_counter()
        first = _get(listener.port)
        assert time.perf_counter() - t0 < 1.0, "the listener must not wait for the blocked loop (1.5 s)"
        assert first.status_code == 200  # blocked for less than stall_s yet: only busy
        time.sleep(0.7)
        stalled = _get(listener.port)
        assert stalled.status_code == 503 and stalled.json()["status"] == "event loop stalled"

        time.sleep(1.2)  # the loop runs again and the heartbeat catches up
        assert _get(listener.port).status_code == 200
    finally:
        asyncio.run_coroutine_threadsafe(listener.stop(), loop_thread).result(5)
    with pytest.raises(httpx.TransportError):
        _get(listener.port)


def test_router_lifespan_serves_the_health_port() -> None:
    port = free_port()
    with SimFleet(1) as fleet, running_router(backends=fleet.urls, health_port=port) as router:
        r = _get(port)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        assert httpx.get(router.url + "/health", timeout=2).status_code == 200
    with pytest.raises(httpx.TransportError):
        _get(port)


_OWNER = """
import asyncio, sys
from router.liveness import LivenessListener
async def main():
    listener = LivenessListener("127.0.0.1", 0)
    await listener.start()
    print(listener.port, flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


def test_helper_exits_when_the_router_is_killed() -> None:
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        port = int(owner.stdout.readline())
        assert _get(port).status_code == 200
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(5)
    deadline = time.monotonic() + 5
    while True:  # the helper notices its parent is gone within a poll interval or so
        try:
            _get(port)
        except httpx.TransportError:
            break
        assert time.monotonic() < deadline, "the helper outlived its router"
        time.sleep(0.1)
