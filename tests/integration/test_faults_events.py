"""KV-event faults with real processes: the engine's event publisher disappears (the engine
process is SIGKILLed and comes back on the same HTTP port without KV events). The replica
must drop from precise to approximate mode under load, every request must still succeed,
and routing keeps hitting the cache through route-time (approximate) entries.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx

from loadtest.engine import SimFleet
from tests.conftest import ROOT, SIM_MODEL
from tests.support.faultload import PREFIXES, load_in_thread
from tests.support.router import metric, running_router
from tests.support.servers import env_without_proxies

TIMING = ["--decode-ms", "5", "--prefill-base-ms", "1"]


def _precise(router_url: str, backend: str) -> float:
    return metric(router_url, "cache_router_precise_mode", backend=backend)


def test_event_publisher_gone_degrades_to_approximate_mode_without_errors() -> None:
    with SimFleet(1, block_size=16, kv_events="bind", zero=False, extra_args=TIMING, mode="process") as fleet:
        spec = fleet[0]
        backend = {"url": spec.url, "kv_events": spec.kv_events, "kv_replay": spec.kv_replay}
        with running_router(backends=[backend], tokenizer=str(SIM_MODEL), block_size=16, log_decisions=False,
                            index={"selfcheck": False, "events_silence_s": 0.5}) as router:
            deadline = time.monotonic() + 10
            while _precise(router.url, spec.url) != 1:
                httpx.post(router.url + "/v1/completions",
                           json={"model": "sim-model", "prompt": PREFIXES[0], "max_tokens": 1}, timeout=10)
                assert time.monotonic() < deadline, "never reached precise mode"
                time.sleep(0.2)

            fleet.kill()  # the engine and its event socket are gone
            plain = subprocess.Popen(
                [sys.executable, "-m", "loadtest", "engine", "--port", str(spec.port), "--engines", "1",
                 "--block-size", "16", *TIMING], cwd=ROOT, env=env_without_proxies(),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 30
                while True:  # the replica is back (without events) and the router sees it healthy
                    try:
                        if httpx.get(router.url + "/ready", timeout=1).status_code == 200 and \
                                httpx.get(spec.url + "/health", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    assert time.monotonic() < deadline, "the engine never came back"
                    time.sleep(0.1)
                time.sleep(0.5)
                stop = threading.Event()
                worker, tally = load_in_thread([router.url], n=100_000, concurrency=6, stream_share=0.3,
                                               max_tokens=20, stop=stop)
                t0 = time.monotonic()
                while _precise(router.url, spec.url) != 0:
                    assert time.monotonic() - t0 < 15, "still precise with no events arriving"
                    time.sleep(0.2)
                degraded_after = time.monotonic() - t0
                time.sleep(1.0)  # keep serving in approximate mode
                stop.set()
                worker.join(30)
                line = tally.line("event publisher gone under load")
                print(f"\n{line}; approximate mode after {degraded_after:.1f}s")
                assert tally.failed == 0 and tally.hung == 0, line
                # Approximate mode still finds prefixes: route-time entries, confirmed by the engine.
                body = {"model": "sim-model", "prompt": PREFIXES[5] + "approximate now", "max_tokens": 1}
                httpx.post(router.url + "/v1/completions", json=body, timeout=10)
                time.sleep(0.2)
                again = httpx.post(router.url + "/v1/completions", json=body, timeout=10)
                matched = int(again.headers["x-cache-router-matched-tokens"])
                cached = again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
                print(f"approximate mode: matched {matched}, engine cached {cached}")
                assert matched > 0 and matched == cached
            finally:
                plain.terminate()
                plain.wait(10)

