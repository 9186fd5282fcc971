"""Replica faults under load, with real processes: one simulated engine per process, so one
replica can be SIGKILLed while the others serve; a replica that hangs; a replica that comes
back empty. Each test prints requests sent, failed and hung (``-s``).

Contract proven here: non-streaming requests all succeed (retried on another replica before
the first byte); a stream in flight on a replica that dies ends with the router's SSE error
event, never a hang or a silent cut; a hung replica costs its own requests one first-byte
timeout (then they are retried) and never slows the others; a replica that restarts empty
never keeps a stale prediction (the index is cleared or corrected).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from loadtest.engine import SimFleet
from tests.conftest import SIM_MODEL
from tests.support.faultload import PREFIXES, load_in_thread, run_load
from tests.support.router import ADMIN, running_router
from tests.support.servers import UvicornThread

# ~5 ms per token: an 8-token answer takes ~50 ms, a 60-token stream ~0.3 s, so a kill lands mid-stream.
TIMING = ["--decode-ms", "5", "--prefill-base-ms", "2", "--prefill-ms-per-token", "0.01"]


@contextlib.contextmanager
def engines(n: int) -> Iterator[list[SimFleet]]:
    fleets = [SimFleet(1, block_size=16, zero=False, extra_args=TIMING, mode="process") for _ in range(n)]
    try:
        for f in fleets:
            f.start()
        yield fleets
    finally:
        for f in fleets:
            f.stop()


def _router(fleets: list[SimFleet], **overrides: Any) -> contextlib.AbstractContextManager[UvicornThread]:
    return running_router(backends=[f.urls[0] for f in fleets], tokenizer=str(SIM_MODEL), block_size=16,
                          log_decisions=False, scheduling={"metrics_interval_s": 0.2}, **overrides)


def _decoding(fleets: list[SimFleet], worker: threading.Thread) -> SimFleet:
    """The first replica seen decoding several requests at once (so streams are mid-answer)."""
    seen = {id(f): 0 for f in fleets}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert worker.is_alive(), "load ended before the kill: raise n"
        for f in fleets:
            st = f.stats(0)
            if st["running"] >= 3 and seen[id(f)] and st["generation_tokens"] > seen[id(f)]:
                return f
            seen[id(f)] = st["generation_tokens"]
        time.sleep(0.05)
    raise AssertionError("no replica was decoding several requests")


def test_replica_sigkilled_under_load(capsys: pytest.CaptureFixture[str]) -> None:
    health = {"interval_s": 0.2, "timeout_s": 0.5, "failure_threshold": 1, "breaker_cooldown_s": 0.5}
    with engines(3) as fleets, _router(fleets, health=health) as router:
        worker, tally = load_in_thread([router.url], n=120, concurrency=24, stream_share=0.6, max_tokens=60)
        victim = _decoding(fleets, worker)  # it dies with answers half-streamed
        victim.kill()
        killed_at = tally.sent
        worker.join(60)
        assert not worker.is_alive()
        line = tally.line(f"replica SIGKILLed after {killed_at} of 120 requests")
        print("\n" + line)
        assert tally.hung == 0, line
        assert tally.failed == 0, line  # non-streams retried before the first byte; streams end with an event
        assert tally.ok + tally.stream_errors == tally.sent == 120
        assert tally.stream_errors >= 1, "no stream was in flight on the victim: the test proved nothing"
        assert tally.stream_errors <= 24  # only the streams in flight on the victim at the kill

        # Back on the same port, empty: what the index said about it must not survive.
        victim.revive()
        url = victim.urls[0]
        app: Any = router.server.config.app
        backend = app.state.pipeline.fleet.get(url)
        deadline = time.monotonic() + 10
        while not backend.healthy:
            assert time.monotonic() < deadline, "the revived replica never came back"
            time.sleep(0.05)
        # Whatever the index said the dead replica held is gone: it restarted empty.
        stale = 0
        for prefix in PREFIXES:
            plan = httpx.post(router.url + "/debug/route", json={"model": "sim-model", "prompt": prefix + "?"},
                              timeout=10, headers=ADMIN).json()
            stale += sum(r["matched_tokens"] for r in plan["replicas"] if r["backend"] == url)
        # New prompts reach it again, with predictions equal to what the engine really had.
        landed = wrong = 0
        for i in range(40):
            body = {"model": "sim-model", "prompt": f"fresh prompt {i} after the restart " * 8, "max_tokens": 1}
            r = httpx.post(router.url + "/v1/completions", json=body, timeout=10)
            assert r.status_code == 200, r.text
            if r.headers["x-cache-router-backend"] == url:
                landed += 1
                cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
                wrong += int(r.headers["x-cache-router-matched-tokens"]) > cached
            if landed >= 3:
                break
        print(f"after revive: stale matched tokens on the restarted replica {stale}; "
              f"{landed} new requests on it, {wrong} with a stale prediction")
        assert stale == 0 and landed >= 1 and wrong == 0


def test_hung_replica_never_stalls_the_others() -> None:
    with engines(3) as fleets, _router(fleets, timeouts={"first_byte_s": 1.0}) as router:
        asyncio.run(run_load([router.url], n=60, concurrency=6, stream_share=0.3, seed=1))  # warm
        base = asyncio.run(run_load([router.url], n=120, concurrency=6, stream_share=0.3, seed=2))
        fleets[0].set_faults(0, hang=True)
        try:
            hung = asyncio.run(run_load([router.url], n=120, concurrency=6, stream_share=0.3, seed=3))
        finally:
            fleets[0].set_faults(0, hang=False)
        print("\n" + base.line("baseline, 3 replicas"))
        print(hung.line("replica 0 hung"))
        assert hung.failed == 0 and hung.hung == 0, hung.line("hung")
        hung_url = fleets[0].urls[0]
        assert hung.backends[hung_url] == 0  # nothing was answered by the hung replica
        # Requests first sent to the hung replica waited one first-byte timeout, then were retried;
        # everything else kept its baseline latency.
        retried = [x for x in hung.latencies if x >= 1.0]
        others = sorted(x for x in hung.latencies if x < 1.0)
        base_lat = sorted(base.latencies)
        p90 = others[int(len(others) * 0.9)]
        base_p90 = base_lat[int(len(base_lat) * 0.9)]
        print(f"retried after the first-byte timeout: {len(retried)}; others p90 {p90 * 1000:.0f} ms "
              f"(baseline p90 {base_p90 * 1000:.0f} ms)")
        assert len(retried) <= 10  # the breaker (or the load scorer) stops sending to it quickly
        assert p90 < base_p90 * 2 + 0.1


def test_hung_replica_alone_is_a_504_at_the_first_byte_timeout() -> None:
    with engines(1) as fleets, _router(fleets, timeouts={"first_byte_s": 0.5}) as router:
        fleets[0].set_faults(0, hang=True)
        t0 = time.monotonic()
        r = httpx.post(router.url + "/v1/completions",
                       json={"model": "sim-model", "prompt": "anyone there?", "max_tokens": 2}, timeout=10)
        took = time.monotonic() - t0
        fleets[0].set_faults(0, hang=False)
        print(f"\nhung single replica: {r.status_code} after {took:.2f}s")
        assert r.status_code == 504 and r.json()["error"]["code"]
        assert 0.5 <= took < 3.0  # one attempt per retry at most, never the 300 s default
