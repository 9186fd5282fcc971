"""``cache-router serve --workers N``: several processes on one port share one index: the Redis
one, or without Redis the in-process one (its writes exchanged between workers, router.index.peers).

A real ``serve`` process with two workers (and a real redis-server) and a simulated engine:
requests on fresh connections land on both workers (told apart by the per-process
request-id prefix), and a prefix recorded by one worker is matched by the other.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from loadtest.engine import SimFleet
from tests.support.servers import RedisServer, free_port

PROMPT = "the cache router sends every request to the replica that holds its prefix " * 20


def test_two_workers_share_the_port_and_the_redis_index(redis_server: RedisServer, namespace: str,
                                                        sim_model_dir: Path, tmp_path: Path) -> None:
    # a generous Redis deadline: on a loaded CI box a 5 ms miss would fail open to 0 matched
    config = f"log_decisions: false\nindex:\n  namespace: {namespace}\n  deadline_ms: 500\n"
    matched = two_workers(tmp_path, sim_model_dir, config, ["--redis-url", redis_server.url])
    assert len(matched) == 2, matched
    # both workers see the prefix that one of them recorded
    assert all(min(m) > 0 for m in matched.values()), matched


def test_two_workers_share_the_in_process_index_without_redis(sim_model_dir: Path, tmp_path: Path) -> None:
    prompts = [f"document {i}: " + PROMPT for i in range(12)]
    cross = two_workers(tmp_path, sim_model_dir, "log_decisions: false\n", [], prompts=prompts)
    # a prompt first served by one worker, its follow-up by the other: matched through the exchange
    assert cross, "no follow-up landed on the other worker"
    assert all(m > 0 for m in cross), cross


def test_a_killed_worker_costs_no_request_and_its_replacement_joins_the_exchange(
        sim_model_dir: Path, tmp_path: Path) -> None:
    prompts = [f"report {i}: " + PROMPT for i in range(12)]
    cross = two_workers(tmp_path, sim_model_dir, "log_decisions: false\n", [], prompts=prompts, kill_one=True)
    assert cross, "no follow-up landed on the other worker"
    assert all(m > 0 for m in cross), cross


def two_workers(tmp_path: Path, sim_model_dir: Path, config_text: str, flags: list[str],
                prompts: list[str] | None = None, kill_one: bool = False) -> Any:
    """Matched tokens per worker for one prompt sent 40 times, after both workers served it; or,
    given ``prompts``, each sent once and then extended once: the matched tokens of the
    extensions that a different worker served than the original. ``kill_one``: first SIGKILL a
    worker while requests keep coming (every one must succeed) and let uvicorn replace it."""
    config = tmp_path / "router.yaml"
    config.write_text(config_text)
    port = free_port()
    with SimFleet(1) as fleet:
        proc = subprocess.Popen(
            [sys.executable, "-m", "router", "serve", "--config", str(config), "--port", str(port),
             "--backend", fleet.urls[0], "--tokenizer", str(sim_model_dir), *flags,
             "--workers", "2", "--log-level", "warning"],
            env={**os.environ, "NO_PROXY": "*"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                try:
                    if httpx.get(base + "/ready", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "router did not become ready"
                time.sleep(0.2)
            body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 1}
            assert httpx.post(base + "/v1/completions", json=body, timeout=10).status_code == 200
            # Each worker's first Redis call also connects and loads the lookup script: on a
            # loaded machine that can miss the deadline and fail open once. Warm both first
            # (without Redis: both have found each other by then).
            _both_serve(base, body)
            time.sleep(0.5)  # the index write is a background task of the worker that served it
            if kill_one:
                workers = _workers(proc.pid)
                assert len(workers) == 2, workers
                workers[0].kill()
                for _ in range(50):  # the survivor answers meanwhile; uvicorn starts a replacement
                    assert httpx.post(base + "/v1/completions", json=body, timeout=10).status_code == 200
                    time.sleep(0.02)
                deadline = time.monotonic() + 30
                while len(_workers(proc.pid)) < 2:
                    assert time.monotonic() < deadline, "no replacement worker"
                    time.sleep(0.2)
                time.sleep(3)  # the replacement starts, then each finds the other at its next scan
                assert _both_serve(base, body), "the replacement worker took no connection"
            if prompts is not None:
                time.sleep(1.5)  # the first worker up finds the second at its next scan (peers.RESCAN_S)
                return _follow_ups(base, prompts)
            matched: dict[str, list[int]] = {}
            for _ in range(40):
                # a new connection each time: the kernel hands it to either worker
                r = httpx.post(base + "/v1/completions", json=body, timeout=10)
                assert r.status_code == 200, r.text
                worker = r.headers["x-request-id"].split("-")[0]
                matched.setdefault(worker, []).append(int(r.headers["x-cache-router-matched-tokens"]))
                # let both workers reach epoll again, so either may take the next connection
                time.sleep(0.01)
            return matched
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _workers(pid: int) -> list[psutil.Process]:
    """uvicorn's worker processes (spawned; not multiprocessing's resource tracker)."""
    return [c for c in psutil.Process(pid).children() if "spawn_main" in " ".join(c.cmdline())]


def _both_serve(base: str, body: dict[str, Any]) -> bool:
    """Post until both workers have answered (the kernel hands each new connection to one)."""
    seen: set[str] = set()
    for _ in range(200):
        if len(seen) == 2:
            return True
        seen.add(httpx.post(base + "/v1/completions", json=body, timeout=10).headers["x-request-id"].split("-")[0])
        time.sleep(0.01)
    return False


def _follow_ups(base: str, prompts: list[str]) -> list[int]:
    """Matched tokens of follow-ups served by the other worker than their prompt; the kernel's
    choice of worker is not even, so up to five batches of prompts until some cross over."""
    cross: list[int] = []
    for batch in range(5):
        cross += _follow_up_batch(base, [f"batch {batch}, {p}" for p in prompts])
        if cross:
            break
    return cross


def _follow_up_batch(base: str, prompts: list[str]) -> list[int]:
    served: dict[str, str] = {}
    for p in prompts:  # a new connection each time: the kernel hands it to either worker
        r = httpx.post(base + "/v1/completions", json={"model": "sim-model", "prompt": p, "max_tokens": 1}, timeout=10)
        assert r.status_code == 200, r.text
        served[p] = r.headers["x-request-id"].split("-")[0]
        time.sleep(0.01)
    time.sleep(0.3)
    cross = []
    for p in prompts:
        r = httpx.post(base + "/v1/completions", json={"model": "sim-model", "prompt": p + " and more", "max_tokens": 1},
                       timeout=10)
        assert r.status_code == 200, r.text
        if r.headers["x-request-id"].split("-")[0] != served[p]:
            cross.append(int(r.headers["x-cache-router-matched-tokens"]))
        time.sleep(0.01)
    return cross
