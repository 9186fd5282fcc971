"""``python -m loadtest run``: one workload against one target, written as JSON + Markdown + PNGs.

The argument groups (workload, arrivals, engines) are shared with ``python -m loadtest
compare`` so both commands read the same flags the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from pathlib import Path
from typing import Any

import httpx

from loadtest.runner.engines import discover_engines, fleet_capacity_tokens
from loadtest.runner.run import RunOptions, RunResult, run_workload
from loadtest.workloads import WORKLOAD_NAMES, Workload, build_workload
from loadtest.workloads.text import SIM_MODEL_DIR


def add_workload_args(parser: argparse.ArgumentParser, many: bool = False) -> None:
    g = parser.add_argument_group("workload (defaults per workload kind when omitted)")
    g.add_argument("--workload", required=True, choices=WORKLOAD_NAMES, nargs="+" if many else None,
                   help="several names: one comparison each, plus a summary across them" if many else None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--requests", type=int, help="requests to generate and send (workload default: 200)")
    g.add_argument("--groups", type=int, help="shared_prefix: distinct system prompts")
    g.add_argument("--system-tokens", type=int, help="length of the shared / per-session prefix")
    g.add_argument("--question-tokens", type=int, help="length of each request's own question")
    g.add_argument("--output-tokens", type=int, help="max_tokens of each request")
    g.add_argument("--turns", type=int, help="multi_turn: turns per conversation")
    g.add_argument("--hot-fraction", type=float, help="hot_prefix: share of requests on the hot prefix")
    g.add_argument("--churn-factor", type=float, help="churn: distinct prefix tokens / fleet cache tokens")
    g.add_argument("--capacity-tokens", type=int,
                   help="churn: the fleet's cache in tokens (default: read from the engines' cache_config_info)")
    g.add_argument("--trace", help="mooncake: a trace file (default: the workload's file in ../shared/traces)")
    g.add_argument("--offset", type=int, help="mooncake: records to skip first")
    g.add_argument("--trace-block-tokens", dest="block_tokens", type=int,
                   help="mooncake: tokens per hash_id (the trace's is 512; default 32)")
    g.add_argument("--time-scale", type=float, help="mooncake: multiply trace timestamps (0.1 = 10x faster)")
    g.add_argument("--output-scale", type=float, help="mooncake: multiply output lengths")
    g.add_argument("--max-output-tokens", type=int, help="mooncake: cap on max_tokens")
    g.add_argument("--max-input-tokens", type=int,
                   help="mooncake: clip longer prompts to N tokens (an engine rejects prompts past its cache)")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("how to send")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals at R requests/s")
    mode.add_argument("--concurrency", type=int, help="closed loop: C conversations in flight (default 8)")
    g.add_argument("--duration", type=float, help="no request starts after D seconds")
    g.add_argument("--ramp", type=float, default=0.0, metavar="SECONDS",
                   help="closed loop: the clients join one by one over this time (default 0: all at once)")
    g.add_argument("--api", choices=("completions", "chat"), default="completions",
                   help="text workloads as /v1/completions or /v1/chat/completions (traces: always completions)")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="stream responses (needed for TTFT and inter-token latency)")
    g.add_argument("--model", help="model name (default: the target's first /v1/models entry)")
    g.add_argument("--engines", nargs="+", metavar="URL",
                   help="engine URLs whose /metrics to read (default: discovered from a cache-router target)")
    g.add_argument("--block-size", type=int, help="ceiling block size (default: from the engines)")
    g.add_argument("--tokenizer", default=str(SIM_MODEL_DIR), help="model directory for the ceiling's tokenizer")
    g.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds (whole request, stream included)")
    g.add_argument("--think-time", type=float, default=0.0, help="multi_turn: seconds between reply and next turn")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def workload_params(args: argparse.Namespace) -> dict[str, Any]:
    names = ("requests", "groups", "system_tokens", "question_tokens", "output_tokens", "turns", "hot_fraction",
             "churn_factor", "capacity_tokens", "trace", "offset", "block_tokens", "time_scale", "output_scale",
             "max_output_tokens", "max_input_tokens")
    params = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if "requests" not in params and args.duration and args.rate:
        # Enough requests to keep the rate up for the whole duration (the duration then ends the run).
        params["requests"] = max(200, math.ceil(args.rate * args.duration * 1.1))
    return params


def run_options(args: argparse.Namespace, engines: list[str] | None) -> RunOptions:
    return RunOptions(api=args.api, stream=args.stream, rate=args.rate, concurrency=args.concurrency,
                      duration_s=args.duration, max_requests=args.requests, engines=engines, model=args.model,
                      block_size=args.block_size, tokenizer_dir=args.tokenizer, request_timeout_s=args.timeout,
                      think_time_s=args.think_time, ramp_s=args.ramp, progress=args.progress)


async def prepare_workload(name: str, seed: int, engines: list[str], **params: Any) -> Workload:
    """Build the workload; churn sizes itself to the engines' real cache when not told."""
    if name == "churn" and params.get("capacity_tokens") is None and engines:
        async with httpx.AsyncClient(trust_env=False) as client:
            capacity = await fleet_capacity_tokens(client, engines)
        if capacity:
            params["capacity_tokens"] = capacity
    return await asyncio.to_thread(build_workload, name, seed, **params)


async def resolve_engines(target: str | None, engines: list[str] | None) -> list[str]:
    if engines:
        return [e.rstrip("/") for e in engines]
    if target is None:
        return []
    async with httpx.AsyncClient(trust_env=False) as client:
        return await discover_engines(client, target)


async def _main(args: argparse.Namespace) -> RunResult:
    targets = [e.rstrip("/") for e in args.engines] if args.direct_round_robin else [args.target]
    engines = await resolve_engines(args.target if not args.direct_round_robin else None, args.engines)
    workload = await prepare_workload(args.workload, args.seed, engines, **workload_params(args))
    return await run_workload(workload, targets, run_options(args, engines or None),
                              name=args.name or ("direct-round-robin" if args.direct_round_robin else None))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest run", description=__doc__.split("\n")[0])
    parser.add_argument("--target", help="OpenAI-compatible base URL (a router or one engine)")
    parser.add_argument("--direct-round-robin", action="store_true",
                        help="no proxy: send to the --engines URLs in turn")
    parser.add_argument("--name", help="label of this arm in the report")
    parser.add_argument("--out", type=Path, required=True, help="FILE.json; FILE.md and FILE-*.png beside it")
    parser.add_argument("--no-records", action="store_true", help="leave per-request records out of the JSON")
    add_workload_args(parser)
    add_run_args(parser)
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.target and not (args.direct_round_robin and args.engines):
        parser.error("give --target URL, or --direct-round-robin with --engines URL...")
    from loadtest.report import print_table, write_report

    result = asyncio.run(_main(args))
    paths = write_report([result], args.out, records=not args.no_records)
    print_table([result])
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if result.summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
