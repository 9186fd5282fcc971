"""Soak: a bounded mixed load with faults against a real ``cache-router serve`` process.

Three simulated engines, one process each; requests (30% streams) share 16 prefixes with a
unique tail each, so the index sees new blocks all the time. Faults cycle, one at a time:
a replica answering 30% errors, a replica restarted empty, a replica SIGKILLed and revived,
a replica hung. Measured: requests sent / failed / hung (a stream ended by the router's SSE
error event when its replica was killed is counted apart: the client is told, nothing is
lost silently), the router's RSS (psutil) and the index's blocks (its /metrics), sampled
every few seconds. Flat means: the end is within a margin of the level after warm-up.

Short form in CI (``CR_SOAK_SECONDS``, default 45 with ``CI=true``, else 20); the long form
(``-m slow``, 600 s) runs only when ``CR_SOAK_LONG=1``, since CI runs every marker.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from loadtest.engine import SimFleet
from tests.conftest import SIM_MODEL
from tests.support.faultload import load_in_thread
from tests.support.router import metric, serve_process

TIMING = ["--decode-ms", "2", "--prefill-base-ms", "1"]
CACHE_BLOCKS = 512
SHORT_S = float(os.environ.get("CR_SOAK_SECONDS") or (45 if os.environ.get("CI") == "true" else 20))
SAMPLE_S = 1.0


def _serve(tmp: Path, urls: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    proc, url, _ = serve_process(tmp, {
        "backends": [{"url": u} for u in urls], "tokenizer": str(SIM_MODEL), "block_size": 16,
        "log_level": "warning", "log_decisions": False,
        "health": {"interval_s": 0.2, "timeout_s": 0.5, "failure_threshold": 1, "breaker_cooldown_s": 1.0},
        "timeouts": {"first_byte_s": 2.0}})
    return proc, url


def _faults(fleets: list[SimFleet]) -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    """(name, start, end) of each fault; they run one at a time, in turn."""
    def kill() -> None:
        fleets[0].kill()

    def revive() -> None:
        fleets[0].revive()

    return [
        ("errors 30% on replica 1", lambda: fleets[1].set_faults(0, error_rate=0.3),
         lambda: fleets[1].set_faults(0, error_rate=0.0)),
        ("replica 2 restarted empty", lambda: fleets[2].restart(0), lambda: None),
        ("replica 0 SIGKILLed, revived", kill, revive),
        ("replica 1 hung", lambda: fleets[1].set_faults(0, hang=True), lambda: fleets[1].set_faults(0, hang=False)),
    ]


def soak(tmp: Path, seconds: float) -> None:
    fleets = [SimFleet(1, block_size=16, cache_blocks=CACHE_BLOCKS, zero=False, extra_args=TIMING,
                       mode="process") for _ in range(3)]
    try:
        for f in fleets:
            f.start()
        proc, url = _serve(tmp, [f.urls[0] for f in fleets])
        try:
            router = psutil.Process(proc.pid)
            stop = threading.Event()
            worker, tally = load_in_thread([url], n=10_000_000, concurrency=8, stream_share=0.3, max_tokens=12,
                                           stop=stop, hang_s=30)
            rss: list[float] = []
            blocks: list[float] = []
            faults = _faults(fleets)
            injected: list[str] = []
            t0 = time.monotonic()
            next_fault = t0 + 3.0
            active: tuple[Callable[[], object], float] | None = None
            while time.monotonic() - t0 < seconds:
                time.sleep(SAMPLE_S)
                assert worker.is_alive()
                rss.append(router.memory_info().rss / 2**20)
                blocks.append(metric(url, "cache_router_index_blocks"))
                now = time.monotonic()
                if active is not None and now >= active[1]:
                    active[0]()  # end the fault
                    # Health probes and circuit breakers settle before the next fault: one at a time.
                    active, next_fault = None, now + 4.0
                elif active is None and now >= next_fault and now - t0 < seconds - 8:
                    name, start, end = faults[len(injected) % len(faults)]
                    start()
                    injected.append(name)
                    active = (end, now + 3.0)
            if active is not None:
                active[0]()
            stop.set()
            worker.join(60)
            assert not worker.is_alive(), "load did not finish"
        finally:
            proc.terminate()
            code = proc.wait(60)
        warm = max(1, len(rss) // 4)  # the level after warm-up: tokenizer, pools, caches filled
        base_rss, end_rss = max(rss[:warm + 1]), rss[-1]
        capacity = 3 * CACHE_BLOCKS
        print(f"\nsoak {seconds:.0f}s: {tally.line('mixed load with faults')}")
        print(f"faults injected in turn: {len(injected)} ({', '.join(sorted(set(injected)))})")
        print(f"router RSS MiB: start {rss[0]:.1f}, after warm-up {base_rss:.1f}, end {end_rss:.1f}, "
              f"max {max(rss):.1f}; index blocks: start {blocks[0]:.0f}, max {max(blocks):.0f}, "
              f"end {blocks[-1]:.0f} (capacity {capacity}); router exit {code}")
        assert tally.failed == 0 and tally.hung == 0, tally.line("soak")
        assert tally.stream_errors <= tally.streams * 0.05
        assert len(injected) >= 2
        assert end_rss <= base_rss * 1.15 + 8, "router memory grew under a steady load"
        assert max(blocks) <= capacity, "the index outgrew the replicas' capacity"
        assert code == 0
    finally:
        for f in fleets:
            f.stop()


def test_soak_short(tmp_path: Path) -> None:
    soak(tmp_path, SHORT_S)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(os.environ.get("CR_SOAK_LONG") != "1", reason="the 10-minute soak runs with CR_SOAK_LONG=1")
def test_soak_long(tmp_path: Path) -> None:
    soak(tmp_path, 600)
