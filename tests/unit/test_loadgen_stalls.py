"""The stall probe (a real subprocess) and the report that lines stalls up with slow requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from loadtest.runner.rounds import merge_rounds
from loadtest.runner.stalls import report
from tests.unit.test_loadgen_rounds import _round

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "loadtest" / "runner" / "stall_probe"

_STALLING = """
import asyncio, gc, time
junk = [[i] for i in range(300_000)]
async def main():
    await asyncio.sleep(0.05)
    time.sleep(0.08)          # blocks the loop: the watchdog's callback runs late
    await asyncio.sleep(0.05)
    gc.collect()              # a full collection over 300k lists
asyncio.run(main())
"""


def test_probe_logs_collections_and_loop_lag_of_a_real_process(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(PROBE), LOADTEST_STALL_PROBE=str(tmp_path))
    subprocess.run([sys.executable, "-c", _STALLING], env=env, check=True, timeout=60)
    events = [json.loads(line) for f in tmp_path.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert any(e["k"] == "gc" and e["gen"] == 2 for e in events)
    assert any(e["k"] == "loop" and e["d"] >= 0.05 for e in events)


def test_probe_is_off_without_its_variable(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOADTEST_STALL_PROBE"} | {"PYTHONPATH": str(PROBE)}
    subprocess.run([sys.executable, "-c", _STALLING], env=env, check=True, timeout=60, cwd=tmp_path)
    assert not list(tmp_path.glob("*.jsonl"))


def test_report_names_the_stall_beside_the_slowest_request(tmp_path: Path) -> None:
    slow = [50.0] * 99 + [400.0]
    rounds = [_round("cache_aware", [50.0] * 100), _round("cache_aware", slow)]
    for i, r in enumerate(rounds):
        r.summary["t0_monotonic"] = 1000.0 + 10 * i  # round i starts at 1000 + 10 i on the shared clock
    merged = merge_rounds(rounds)
    (tmp_path / "out" / "hot_prefix").mkdir(parents=True)
    (tmp_path / "out" / "hot_prefix" / "compare.json").write_text(json.dumps({"arms": [merged.to_dict()]}))
    slowest = merged.records[-1]
    at = 1010.0 + slowest.start_s - merged.summary["round_offsets_s"][1]
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "1.jsonl").write_text("\n".join(json.dumps(e) for e in [
        {"p": "engines", "k": "gc", "t": at + 0.1, "d": 0.09, "gen": 2},    # inside the slow request
        {"p": "router:x", "k": "gc", "t": 1500.0, "d": 0.07, "gen": 2},     # while nothing was measured
    ]) + "\n")
    text = "\n".join(report(tmp_path / "out", probe))
    assert " 400 ms (round 1," in text and "engines/gc2 90 ms@+100" in text
    assert "collections >= 10 ms while measured: engines [90]" in text
    assert "router:x" not in text
