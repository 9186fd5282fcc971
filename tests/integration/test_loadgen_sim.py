"""The load generator against real simulated engines (``python -m loadtest engine``) on loopback.

The fleet (``SimFleet``, as a subprocess) runs in zero-delay mode and most runs use one request at a time, so every
figure is exact and can be derived independently: round robin over 4 engines hits what
4 separate unlimited caches, each fed every 4th request, would hit; one engine whose cache
holds the working set hits the ceiling.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.compare import DIRECT, compare, reset_fleet
from loadtest.engine import SimFleet
from loadtest.runner import cli
from loadtest.runner.ceiling import SentPrompt, ceiling
from loadtest.runner.run import RunOptions, run_workload
from loadtest.workloads import History, build_workload
from loadtest.workloads.text import load_tokenizer

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def engines() -> Iterator[list[str]]:
    # A subprocess fleet (``python -m loadtest engine``): its own GIL, so the client's timings are its own.
    with SimFleet(4, block_size=16, cache_blocks=512, zero=True, mode="process") as fleet:
        yield list(fleet.urls)


def _prompt_ids(workload_name: str, seed: int, **params: object) -> list[list[int]]:
    tok = load_tokenizer()
    out = []
    for conv in build_workload(workload_name, seed, **params).conversations:
        _, body = History(conv).body(0, "completions", "sim-model")
        out.append(tok.encode_completion(body["prompt"]))
    return out


def test_run_cli_direct_round_robin_matches_the_hand_derived_figure(engines: list[str], tmp_path: Path) -> None:
    asyncio.run(reset_fleet(engines))
    params = {"requests": 48, "groups": 4, "system_tokens": 256, "question_tokens": 32, "output_tokens": 8}
    out = tmp_path / "rr.json"
    argv = ["--direct-round-robin", "--engines", *engines, "--workload", "shared_prefix", "--seed", "5",
            "--requests", "48", "--groups", "4", "--system-tokens", "256", "--question-tokens", "32",
            "--output-tokens", "8", "--concurrency", "1", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    data = json.loads(out.read_text())
    s = data["summary"]
    assert s["ok"] == s["requests"] == 48 and s["errors"] == {}
    assert s["token_count_mismatches"] == 0           # our tokenizer counts what the engines count
    assert s["hit_rate_usage"] == s["hit_rate_counters"]
    assert s["load_balance"] == 1.0 and s["engine_requests_source"] == "direct target"
    # Request i went to engine i % 4. Each engine's cache holds everything it saw (8192 tokens each),
    # so the fleet hits exactly what 4 unlimited caches fed every 4th prompt would hit.
    ids = _prompt_ids("shared_prefix", 5, **params)
    per_engine = [ceiling([SentPrompt(p) for p in ids[e::4]], 16) for e in range(4)]
    expected = sum(c.hit_tokens for c in per_engine) / sum(c.prompt_tokens for c in per_engine)
    assert s["hit_rate_usage"] == pytest.approx(expected, abs=1e-9)
    assert s["ceiling"] == pytest.approx(ceiling([SentPrompt(p) for p in ids], 16).rate)
    assert s["hit_rate_usage"] < s["ceiling"]         # 4 cold misses per group instead of 1
    md = out.with_suffix(".md").read_text()
    assert "| direct-round-robin | 48/48 | 0 |" in md
    for suffix in ("ttft", "engines", "hit-rate"):
        assert (tmp_path / f"rr-{suffix}.png").read_bytes()[:4] == b"\x89PNG"


async def test_compare_starts_every_arm_cold_and_one_engine_reaches_the_ceiling(
        engines: list[str], tmp_path: Path) -> None:
    workload = build_workload("shared_prefix", 9, requests=40, groups=5, system_tokens=192, question_tokens=24,
                              output_tokens=8)
    opts = RunOptions(concurrency=1, progress=False)
    results = await compare(workload, {"one-a": engines[0], "one-b": engines[0]}, engines, opts,
                            direct_round_robin=True, out_dir=tmp_path)
    rr, a, b = results
    assert [r.name for r in results] == [DIRECT, "one-a", "one-b"]
    # Without the reset between arms, b would find a's blocks and beat it.
    assert a.summary["hit_rate_usage"] == b.summary["hit_rate_usage"]
    assert a.summary["hit_rate_usage"] == pytest.approx(a.summary["ceiling"], abs=1e-9)
    assert rr.summary["hit_rate_usage"] < a.summary["hit_rate_usage"]
    assert a.summary["engine_requests"][engines[0]] == 40 and a.summary["load_balance"] == 4.0
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert [arm["name"] for arm in saved["arms"]] == [DIRECT, "one-a", "one-b"]
    assert (tmp_path / "compare-hit-rate.png").exists() and "one-b" in (tmp_path / "compare.md").read_text()


async def test_multi_turn_chat_on_one_engine_reaches_its_ceiling(engines: list[str]) -> None:
    await reset_fleet(engines)
    workload = build_workload("multi_turn", 3, requests=24, turns=4, system_tokens=128, question_tokens=24,
                              output_tokens=24)
    result = await run_workload(workload, engines[1], RunOptions(api="chat", concurrency=3, progress=False))
    s = result.summary
    assert result.engine_urls == [engines[1]]  # an engine target is read as its own fleet
    assert s["ok"] == 24 and s["token_count_mismatches"] == 0
    # Later turns repeat the whole history, including the replies the engine generated.
    assert s["hit_rate_usage"] > 0.5
    assert s["hit_rate_usage"] <= s["ceiling"] + 1e-9
    assert s["hit_rate_usage"] >= 0.95 * s["ceiling"]
    assert all(len(r.itl_s) >= 1 for r in result.records)


async def test_mooncake_replay_on_the_trace_clock(engines: list[str]) -> None:
    await reset_fleet(engines)
    workload = build_workload("mooncake", 1, requests=30, block_tokens=16, time_scale=0.02, max_output_tokens=4)
    result = await run_workload(workload, engines[2], RunOptions(progress=False, engines=[engines[2]]))
    s = result.summary
    assert result.arrival == "trace" and s["ok"] == 30 and s["token_count_mismatches"] == 0
    # One engine with room for these 30 prompts: the trace's shared hash_ids are hits, up to the ceiling
    # (requests with the same timestamp overlap, so one may miss what its twin is still computing).
    assert 0.8 * s["ceiling"] <= s["hit_rate_usage"] <= s["ceiling"] + 1e-9
    assert s["hit_rate_usage"] > 0
    starts = [r.start_s for r in result.records]
    last = workload.conversations[-1].arrival_s or 0.0
    assert max(starts) >= last * 0.9  # sent on the (scaled) trace clock, not all at once


async def test_poisson_run_stops_at_the_duration(engines: list[str]) -> None:
    workload = build_workload("zero_reuse", 2, requests=400, system_tokens=32, question_tokens=8, output_tokens=2)
    result = await run_workload(workload, engines, RunOptions(rate=100.0, duration_s=0.6, progress=False))
    s = result.summary
    assert 20 < s["requests"] < 200
    assert max(r.start_s for r in result.records) <= 0.6
    assert all(r.late_s is not None and r.late_s >= 0 for r in result.records)  # dispatch lag is measured
    assert s["late_s"]["p50"] is not None
    assert s["hit_rate_usage"] == 0.0 and s["ceiling"] == 0.0


async def test_closed_loop_clients_join_one_by_one_over_the_ramp(engines: list[str]) -> None:
    # More requests than the clients can send before the last one joins on a fast machine (400
    # were all answered within 0.3 s here once), bounded by the run's duration instead.
    workload = build_workload("zero_reuse", 3, requests=5000, system_tokens=32, question_tokens=8, output_tokens=2)
    result = await run_workload(workload, engines, RunOptions(concurrency=4, ramp_s=0.4, duration_s=0.8,
                                                              progress=False))
    assert result.summary["ok"] == len(result.records) > 0
    spans = [(r.start_s, r.start_s + r.e2e_s) for r in result.records if r.e2e_s is not None]

    def most_in_flight(t0: float, t1: float) -> int:
        return max((sum(1 for a, b in spans if a <= s < b) for s, _ in spans if t0 <= s < t1), default=0)

    # Clients join at 0, 0.1, 0.2 and 0.3 s: alone at first, all four once the ramp is over
    # (at ramp 0 the first instant already has four in flight).
    assert most_in_flight(0.0, 0.09) == 1
    assert most_in_flight(0.11, 0.19) == 2
    assert most_in_flight(0.31, 10.0) == 4


async def test_a_ramp_longer_than_the_duration_ends_with_the_duration(engines: list[str]) -> None:
    workload = build_workload("zero_reuse", 4, requests=400, system_tokens=32, question_tokens=8, output_tokens=2)
    t0 = time.perf_counter()
    result = await run_workload(workload, engines, RunOptions(concurrency=4, ramp_s=30.0, duration_s=0.5,
                                                              progress=False))
    assert time.perf_counter() - t0 < 10  # not the 22.5 s the last client would have waited to join
    assert result.summary["ok"] > 0 and max(r.start_s for r in result.records) <= 0.5


def test_compare_cli_over_two_workloads_writes_a_summary(engines: list[str], tmp_path: Path) -> None:
    from loadtest.compare import main as compare_main

    argv = ["--workload", "zero_reuse", "hot_prefix", "--seed", "1", "--requests", "16", "--system-tokens", "64",
            "--question-tokens", "8", "--output-tokens", "2", "--concurrency", "2", "--direct-round-robin",
            "--target", f"one={engines[3]}", "--engines", *engines, "--no-progress", "--out", str(tmp_path)]
    assert compare_main(argv) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| zero_reuse | direct-round-robin | 0.0% | 0.0% |" in summary
    assert "| hot_prefix | one |" in summary
    for name in ("zero_reuse", "hot_prefix"):
        arms = json.loads((tmp_path / name / "compare.json").read_text())["arms"]
        assert [a["name"] for a in arms] == [DIRECT, "one"] and all(a["summary"]["ok"] == 16 for a in arms)
    assert (tmp_path / "summary-hit-rate.png").read_bytes()[:4] == b"\x89PNG"


def test_ctrl_c_stops_sending_and_still_writes_the_report(engines: list[str], tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from tests.support.servers import env_without_proxies

    out = tmp_path / "int.json"
    before = sum(_requests(e) for e in engines)  # earlier tests used these engines too
    proc = subprocess.Popen([sys.executable, "-m", "loadtest", "run", "--direct-round-robin", "--engines", *engines,
                             "--workload", "zero_reuse", "--requests", "5000", "--system-tokens", "32",
                             "--question-tokens", "8", "--output-tokens", "2", "--rate", "20", "--no-progress",
                             "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env_without_proxies())
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:  # wait until requests are flowing
            if sum(_requests(e) for e in engines) - before >= 5:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    s = json.loads(out.read_text())["summary"]
    assert 5 <= s["requests"] < 5000 and s["ok"] == s["requests"]
    assert out.with_suffix(".md").exists()


def _requests(url: str) -> float:
    import httpx

    from loadtest.runner.engines import parse_metrics

    return parse_metrics(httpx.get(url + "/metrics", timeout=5).text).requests or 0.0
