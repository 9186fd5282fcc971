"""``cache-router demo``: the main job on the embedded default, end to end, in about a minute.

Starts simulated vLLM engines (``loadtest.engine``, own process, prefill time proportional
to uncached tokens), then cache-router itself (``cache-router serve`` subprocesses on the
in-process index: one per policy), drives a shared-prefix and a multi-turn workload through
each arm and through a direct round robin with no proxy, and prints the comparison: hit
rate against the ceiling (one unlimited cache), TTFT, load balance, errors. No Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from loadtest.bench.procs import Proc, free_port, wait_http
from loadtest.compare import compare
from loadtest.engine import SimFleet
from loadtest.report import print_table
from loadtest.runner.run import RunOptions, RunResult
from loadtest.workloads import build_workload

MODEL_DIR = Path(__file__).resolve().parent.parent / "loadtest" / "models" / "sim-model"


@contextmanager
def router(engines: list[str], policy: str, block_size: int) -> Iterator[str]:
    port = free_port()
    args = [sys.executable, "-m", "router", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--tokenizer", str(MODEL_DIR), "--block-size", str(block_size), "--policy", policy,
            "--log-level", "warning"]
    for url in engines:
        args += ["--backend", url]
    with Proc(args) as proc:
        wait_http(f"http://127.0.0.1:{port}/ready", proc=proc, timeout=60)
        yield f"http://127.0.0.1:{port}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cache-router demo", description=__doc__.split("\n")[0])
    p.add_argument("--engines", type=int, default=4)
    p.add_argument("--requests", type=int, default=240, help="requests per workload")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--workloads", default="shared_prefix,multi_turn")
    p.add_argument("--policies", default="cache_aware,round_robin,least_load")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--cache-blocks", type=int, default=1024, help="KV capacity per engine, in blocks")
    p.add_argument("--prefill-ms-per-token", type=float, default=0.04)
    p.add_argument("--decode-ms", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    return p


def _verdict(results: list[RunResult]) -> str:
    by = {r.name: r.summary for r in results}
    ca = by.get("cache_aware")
    if ca is None:
        return ""
    lines = []
    for name, s in by.items():
        if name == "cache_aware":
            continue
        lines.append(f"  cache_aware vs {name}: hit rate {_pct(ca['hit_rate_usage'])} vs {_pct(s['hit_rate_usage'])}"
                     f" (ceiling {_pct(ca['ceiling'])}), TTFT p99 {_ms(ca['ttft_s']['p99'])} vs {_ms(s['ttft_s']['p99'])}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f} ms"


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    timing = ["--prefill-ms-per-token", str(args.prefill_ms_per_token), "--decode-ms", str(args.decode_ms)]
    print(f"starting {args.engines} simulated engines (block size {args.block_size}, "
          f"{args.cache_blocks} blocks each) and cache-router ({', '.join(policies)}) on 127.0.0.1 ...", flush=True)
    with SimFleet(args.engines, block_size=args.block_size, cache_blocks=args.cache_blocks, zero=False,
                  extra_args=timing, mode="process", max_num_seqs=8) as fleet, ExitStack() as stack:
        engines = list(fleet.urls)
        arms = {p: stack.enter_context(router(engines, p, args.block_size)) for p in policies}
        ok = True
        for name in args.workloads.split(","):
            workload = build_workload(name, args.seed, requests=args.requests)
            options = RunOptions(concurrency=args.concurrency, progress=sys.stdout.isatty(), engines=engines)
            results = asyncio.run(compare(workload, arms, engines, options, direct_round_robin=True,
                                          out_dir=args.out / name, title=f"cache-router demo: {name}"))
            print_table(results)
            print(_verdict(results))
            ok &= all(r.summary["ok"] == r.summary["requests"] for r in results)
        print(f"\nreports: {args.out}/<workload>/compare.md and compare-*.png")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
