"""A long new prompt is tokenized off the event loop: while one is being encoded (hundreds of
ms of tokenizer work), the same router keeps answering others. Its keys are still exact:
the router's prediction for a repeat equals the whole prompt's cacheable blocks."""

from __future__ import annotations

import random
import threading
import time

from tests.conftest import SIM_MODEL
from tests.support.router import HTTP, running_router, scripted_engines

WORDS = ["cache", "router", "block", "prefix", "engine", "token", "replica", "stream", "the", "of"]


def test_long_new_prompt_does_not_stall_other_requests() -> None:
    rng = random.Random(5)
    long_prompt = " ".join(f"{rng.choice(WORDS)}{rng.randrange(10**6)}" for _ in range(120_000))  # ~1.2M chars
    with scripted_engines(1) as (engine,), \
            running_router(backends=[engine.url], tokenizer=str(SIM_MODEL), max_body_bytes=16 << 20) as router:
        t0 = time.perf_counter()
        HTTP.post(router.url + "/v1/completions", json={"model": "sim-model", "prompt": "warm up"}, timeout=30)
        done = threading.Event()
        result: dict[str, object] = {}

        def send_long() -> None:
            r = HTTP.post(router.url + "/v1/completions", json={"model": "sim-model", "prompt": long_prompt},
                          timeout=120)
            result["status"], result["elapsed"] = r.status_code, time.perf_counter() - t0
            done.set()

        sender = threading.Thread(target=send_long, daemon=True)
        t0 = time.perf_counter()
        sender.start()
        gaps = []
        while not done.is_set() and time.perf_counter() - t0 < 60:
            s = time.perf_counter()
            r = HTTP.post(router.url + "/v1/completions", json={"model": "sim-model", "prompt": "short one"},
                          timeout=30)
            assert r.status_code == 200
            gaps.append(time.perf_counter() - s)
        sender.join(120)
        assert result.get("status") == 200
        long_s = float(result["elapsed"])  # type: ignore[arg-type]
        print(f"\nlong prompt answered in {long_s * 1000:.0f} ms; {len(gaps)} short requests meanwhile, "
              f"slowest {max(gaps) * 1000:.0f} ms")
        assert long_s > 0.2  # the long one really took time to encode
        assert len(gaps) >= 3 and max(gaps) < long_s / 2  # others were answered all along
