"""Graceful drain: a real ``cache-router serve`` process and replicas marked draining.

On SIGTERM the router stops accepting new connections, lets in-flight streams finish up to
``shutdown_timeout_s``, then exits 0. A replica marked draining (``draining: true`` in the
config, or ``Fleet.set_draining`` at runtime) receives no new requests.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest.engine import SimFleet
from tests.support.router import running_router, serve_process

# 20 ms per token: a 60-token answer streams for ~1.2 s, long enough to SIGTERM in the middle.
SLOW = ["--decode-ms", "20", "--prefill-base-ms", "1"]


@pytest.fixture(scope="module")
def fleet() -> Iterator[SimFleet]:
    with SimFleet(2, block_size=16, zero=False, extra_args=SLOW) as f:
        yield f


def _serve(tmp: Path, backends: list[Any], shutdown_s: float) -> tuple[subprocess.Popen[bytes], str, Path]:
    return serve_process(tmp, {"backends": backends, "shutdown_timeout_s": shutdown_s,
                               "health": {"interval_s": 0.2, "timeout_s": 0.5}})


def _stream(url: str, max_tokens: int, first: threading.Event, out: dict[str, Any]) -> None:
    body = {"model": "sim-model", "prompt": "drain me gently " * 8, "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True}
    data: list[str] = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data.append(line[6:])
                    first.set()
    except httpx.HTTPError as exc:
        out["error"] = type(exc).__name__
    finally:
        first.set()
        out["data"] = data


def _refused(url: str) -> bool:
    port = int(url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


def _sigterm_mid_stream(fleet: SimFleet, tmp: Path, shutdown_s: float,
                        max_tokens: int) -> tuple[dict[str, Any], int, float, bool, str]:
    proc, url, log_path = _serve(tmp, [{"url": fleet.urls[0]}], shutdown_s)
    first, out = threading.Event(), dict[str, Any]()
    client = threading.Thread(target=_stream, args=(url, max_tokens, first, out), name="stream")
    client.start()
    try:
        assert first.wait(10), "the stream never started"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # New connections are refused while the stream is still being served.
        refused = False
        while time.monotonic() - t0 < 0.8 and not refused:
            refused = _refused(url)
            time.sleep(0.05)
        code = proc.wait(shutdown_s + 15)
        took = time.monotonic() - t0
        client.join(15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    return out, code, took, refused, log


def test_sigterm_finishes_the_in_flight_stream_refuses_new_ones_and_exits_0(
        fleet: SimFleet, tmp_path: Path) -> None:
    out, code, took, refused, log = _sigterm_mid_stream(fleet, tmp_path, shutdown_s=10, max_tokens=60)
    print(f"\ndrain: exit {code} {took:.2f}s after SIGTERM, stream got {len(out['data'])} events, "
          f"new connection refused: {refused}")
    assert code == 0, log[-3000:]
    assert refused, "the router still accepted connections while draining"
    assert out.get("status") == 200 and "error" not in out, out
    assert out["data"][-1] == "[DONE]"  # the whole answer arrived, not a cut stream
    assert sum(1 for d in out["data"] if '"text"' in d) >= 60


def test_drain_is_bounded_by_shutdown_timeout(fleet: SimFleet, tmp_path: Path) -> None:
    # A 2000-token answer takes ~40 s; the router may only wait 1 s for it.
    out, code, took, _, log = _sigterm_mid_stream(fleet, tmp_path, shutdown_s=1.0, max_tokens=2000)
    print(f"\ndrain deadline 1 s: exit {code} {took:.2f}s after SIGTERM, stream got {len(out['data'])} events")
    assert code == 0, log[-3000:]
    assert took < 6.0
    assert "[DONE]" not in out["data"]  # cut at the deadline, not finished


def test_replica_draining_in_config_or_at_runtime_gets_no_new_requests() -> None:
    body = {"model": "sim-model", "prompt": "who gets me? ", "max_tokens": 1}
    with SimFleet(2, block_size=16) as fleet, \
            running_router(backends=[{"url": fleet.urls[0], "draining": False},
                                     {"url": fleet.urls[1], "draining": True}]) as router:
        a, b = fleet.urls
        seen = Counter(httpx.post(router.url + "/v1/completions", json={**body, "prompt": f"q{i} " * 20},
                                  timeout=10).headers["x-cache-router-backend"] for i in range(20))
        assert seen == Counter({a: 20})
        assert fleet.stats(1)["requests"] == 0
        app: Any = router.server.config.app
        fleet_state = app.state.pipeline.fleet
        fleet_state.set_draining(b, False)
        fleet_state.set_draining(a, True)
        seen = Counter(httpx.post(router.url + "/v1/completions", json={**body, "prompt": f"r{i} " * 20},
                                  timeout=10).headers["x-cache-router-backend"] for i in range(20))
        assert seen == Counter({b: 20})
