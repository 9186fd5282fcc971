"""``python -m loadtest.runner.stalls OUT PROBE``: which stalls the slowest requests of a demo sat through.

``OUT`` is a demo's (or ``compare``'s) output directory (``<workload>/compare.json``), ``PROBE``
the directory the stall probe wrote (``loadtest/runner/stall_probe``). For every arm: its
TTFT percentiles, the collections each process made while the arm was measured, and its
slowest requests with every stall of 20 ms or more that overlapped them (process, kind,
duration, start relative to the request's). A slow request with a stall of another process
beside it was slowed by the machine, not by where it was routed.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

SHOWN = 5
MIN_STALL_S = 0.02


def load_events(probe: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for f in sorted(probe.glob("*.jsonl")) for line in f.read_text().splitlines() if line]


def _clock(arm: dict[str, Any], round_: int) -> float | None:
    """The monotonic time at which the arm's ``start_s`` (merged over rounds) would be 0 for this round."""
    s = arm["summary"]
    t0s = s.get("t0_monotonic_rounds")
    if not t0s:
        t0: float | None = s.get("t0_monotonic")
        return t0
    if t0s[round_] is None:
        return None
    return float(t0s[round_] - s["round_offsets_s"][round_])


def arm_windows(arm: dict[str, Any]) -> list[tuple[float, float]]:
    """The arm's measured stretches on the monotonic clock: one per round."""
    by_round: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in arm["records"]:
        by_round[r.get("round", 0)].append(r)
    out = []
    for i, recs in sorted(by_round.items()):
        zero = _clock(arm, i)
        if zero is not None:
            out.append((zero + min(r["start_s"] for r in recs),
                        zero + max(r["start_s"] + (r["e2e_s"] or 0.0) for r in recs)))
    return out


def report(out: Path, probe: Path) -> list[str]:
    events = load_events(probe)
    lines = []
    for path in sorted(out.glob("*/compare.json")):
        lines.append(f"== {path.parent.name}")
        for arm in json.loads(path.read_text())["arms"]:
            ok = [r for r in arm["records"] if r["ok"] and r["ttft_s"] is not None]
            if not ok:
                continue
            ttft = np.array([r["ttft_s"] for r in ok]) * 1000
            p50, p90, p99 = np.percentile(ttft, [50, 90, 99])
            windows = arm_windows(arm)
            gcs: dict[str, list[int]] = defaultdict(list)
            for e in events:
                if e["k"] == "gc" and e["d"] >= 0.01 and any(a <= e["t"] <= b for a, b in windows):
                    gcs[e["p"]].append(round(1000 * e["d"]))
            gc_text = "; ".join(f"{p} {sorted(v)}" for p, v in sorted(gcs.items())) or "none"
            lines.append(f"  {arm['name']:<20} TTFT p50 {p50:.0f} p90 {p90:.0f} p99 {p99:.0f} ms; "
                         f"collections >= 10 ms while measured: {gc_text}")
            for r in sorted(ok, key=lambda r: -r["ttft_s"])[:SHOWN]:
                zero = _clock(arm, r.get("round", 0))
                if zero is None:
                    continue
                start = zero + r["start_s"]
                end = start + r["ttft_s"]
                near = [f"{e['p']}/{e['k']}{e.get('gen', '')} {1000 * e['d']:.0f} ms@{1000 * (e['t'] - start):+.0f}"
                        for e in events if e["d"] >= MIN_STALL_S and e["t"] < end and e["t"] + e["d"] > start]
                lines.append(f"    {1000 * r['ttft_s']:4.0f} ms (round {r.get('round', 0)}, "
                             f"{r['start_s']:.2f} s): {'; '.join(near) or '-'}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n")[0], file=sys.stderr)
        return 2
    print("\n".join(report(Path(argv[0]), Path(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
