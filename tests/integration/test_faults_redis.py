"""Index faults under load, with real processes: Redis killed, paused (SIGSTOP 2 s) and
restarted empty while requests flow (zero failed: the router routes without the index and
recovers by itself); the router itself SIGKILLed and replaced by a new ``cache-router serve``
process on the warm Redis (it routes warm from its first request). Figures printed with ``-s``.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import httpx

from loadtest.engine import SimFleet
from tests.conftest import SIM_MODEL
from tests.support.faultload import PREFIXES, load_in_thread
from tests.support.router import running_router, serve_process
from tests.support.servers import RedisServer

TIMING = ["--decode-ms", "2", "--prefill-base-ms", "1"]


def _complete(url: str, prompt: str) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": "sim-model", "prompt": prompt, "max_tokens": 2},
                      timeout=20)


def test_redis_killed_paused_and_restarted_under_load_fails_nothing(namespace: str) -> None:
    redis = RedisServer().start()
    try:
        with SimFleet(3, block_size=16, zero=False, extra_args=TIMING) as fleet, \
                running_router(backends=fleet.urls, tokenizer=str(SIM_MODEL), block_size=16, log_decisions=False,
                               redis_url=redis.url, index={"namespace": namespace, "deadline_ms": 20}) as router:
            stop = threading.Event()
            worker, tally = load_in_thread([router.url], n=100_000, concurrency=8, stream_share=0.3,
                                           max_tokens=8, stop=stop)
            steps: list[str] = []
            time.sleep(0.5)
            redis.kill()
            steps.append(f"kill at {tally.sent}")
            time.sleep(1.0)
            redis.start()  # back on the same port, empty
            time.sleep(1.0)
            redis.pause()
            steps.append(f"SIGSTOP at {tally.sent}")
            time.sleep(2.0)
            redis.resume()
            time.sleep(1.0)
            redis.restart()
            steps.append(f"restart at {tally.sent}")
            time.sleep(1.0)
            stop.set()
            worker.join(30)
            assert not worker.is_alive()
            line = tally.line("redis killed 1 s, paused 2 s, restarted, under load")
            print(f"\n{line}; {', '.join(steps)}")
            assert tally.sent >= 50
            assert tally.failed == 0 and tally.hung == 0 and tally.stream_errors == 0, line
            # The shared index works again without anyone's help.
            deadline = time.monotonic() + 10
            while True:
                prompt = PREFIXES[3] + f"recovery {time.monotonic()}"
                holder = _complete(router.url, prompt).headers["x-cache-router-backend"]
                time.sleep(0.1)
                again = _complete(router.url, prompt + " again")
                if again.headers["x-cache-router-backend"] == holder and \
                        int(again.headers["x-cache-router-matched-tokens"]) > 0:
                    break
                assert time.monotonic() < deadline, "the index never recovered"
                time.sleep(0.2)
    finally:
        redis.stop()


def _serve(tmp: Path, config: dict[str, object]) -> tuple[subprocess.Popen[bytes], str]:
    proc, url, _ = serve_process(tmp, config)
    return proc, url


def test_router_killed_and_replaced_routes_warm_from_redis(tmp_path: Path, redis_server: RedisServer,
                                                           namespace: str) -> None:
    with SimFleet(3, block_size=16) as fleet:
        config = {"backends": [{"url": u} for u in fleet.urls], "tokenizer": str(SIM_MODEL), "block_size": 16,
                  "shutdown_timeout_s": 5,
                  "redis_url": redis_server.url, "index": {"namespace": namespace, "deadline_ms": 200}}
        first, url = _serve(tmp_path, config)
        try:
            holders = {i: _complete(url, PREFIXES[i] + "before the crash").headers["x-cache-router-backend"]
                       for i in range(6)}
            time.sleep(0.3)  # records land after the answers
        finally:
            first.kill()  # a crash, not a drain
            first.wait()
        second, url = _serve(tmp_path, config)
        try:
            warm = 0
            for i, holder in holders.items():
                r = _complete(url, PREFIXES[i] + "after the crash")
                assert r.status_code == 200
                warm += r.headers["x-cache-router-backend"] == holder and \
                    int(r.headers["x-cache-router-matched-tokens"]) > 0
            print(f"\nrouter SIGKILLed and replaced: {warm} of {len(holders)} prefixes routed warm "
                  "by the new process on its first request each")
            assert warm == len(holders)
        finally:
            t0 = time.monotonic()
            second.terminate()
            try:
                code = second.wait(30)
            except subprocess.TimeoutExpired:
                second.kill()
                logs = sorted(tmp_path.glob("router-*.log"))
                raise AssertionError("no exit 30 s after SIGTERM:\n" + logs[-1].read_text()[-4000:]) from None
        print(f"replacement router: exit {code} {time.monotonic() - t0:.2f}s after SIGTERM")
        assert code == 0
