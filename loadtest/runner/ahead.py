"""``python -m loadtest.runner.ahead OUT``: what the slowest requests of a demo waited behind on their engine.

``OUT`` is a demo's (or ``compare``'s) output directory (``<workload>/compare.json``). For every
arm and round, its slowest requests by TTFT, each with whether it was a hit or a miss and the
requests of the same arm already sent to the same engine and not yet answered with a first
byte when it was sent (hit or miss, milliseconds since they were sent). A slow request with
nothing ahead of it on its engine was slowed by the machine, not by where it was routed; one
behind misses on its engine is the queue the scheduler chose.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SHOWN = 4


def _kind(r: dict[str, Any]) -> str:
    return "hit" if (r.get("cached_tokens") or 0) > 0 else "miss"


def ahead_of(r: dict[str, Any], same_round: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Requests sent to ``r``'s engine before it that had no first byte yet when it was sent."""
    s = r["start_s"]
    return [o for o in same_round
            if o is not r and o["backend"] == r["backend"] and o["start_s"] <= s and o["start_s"] + o["ttft_s"] > s]


def report(out: Path, shown: int = SHOWN) -> list[str]:
    lines = []
    for path in sorted(out.glob("*/compare.json")):
        lines.append(f"== {path.parent.name}")
        for arm in json.loads(path.read_text())["arms"]:
            by_round: dict[int, list[dict[str, Any]]] = defaultdict(list)
            for r in arm["records"]:
                if r.get("ok", True) and r.get("ttft_s") is not None and r.get("backend"):
                    by_round[r.get("round", 0)].append(r)
            lines.append(f"  {arm['name']}" + ("" if by_round else ": no engine recorded per request"))
            for rnd, recs in sorted(by_round.items()):
                for r in sorted(recs, key=lambda r: -r["ttft_s"])[:shown]:
                    queue = ahead_of(r, recs)
                    what = ", ".join(f"{_kind(o)} sent {1000 * (r['start_s'] - o['start_s']):.0f} ms before"
                                     for o in sorted(queue, key=lambda o: o["start_s"])) or "nothing"
                    lines.append(f"    round {rnd}: {1000 * r['ttft_s']:4.0f} ms {_kind(r):<4} "
                                 f"{r.get('prompt_tokens', '?')} tokens; ahead on its engine: {what}")
    return lines


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.runner.ahead", description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="a demo's output directory (<workload>/compare.json)")
    ap.add_argument("--shown", type=int, default=SHOWN, help="slowest requests per arm and round")
    args = ap.parse_args(argv)
    print("\n".join(report(args.out, args.shown)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
