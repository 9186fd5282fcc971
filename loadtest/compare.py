"""``python -m loadtest compare``: one workload and seed against several routers or policies.

Every arm gets the same requests (same workload, same seed, same arrivals) and starts
cold: between arms the runner waits for the engines to go idle and POSTs
``/reset_prefix_cache`` to each. One arm can be the built-in direct round robin, which
sends straight to the engines in turn with no proxy: the plain load balancer that
cache-aware routing must never lose to. The result is one table (rich and Markdown)
and one set of plots.

Python API (what the demo calls)::

    workload = build_workload("shared_prefix", seed=1, requests=200)
    results = await compare(workload, {"cache_aware": "http://127.0.0.1:8080"}, engines=[...],
                            options=RunOptions(concurrency=16), direct_round_robin=True, out_dir=Path("out"))
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from loadtest.runner.cli import (
    add_run_args,
    add_workload_args,
    prepare_workload,
    run_options,
    workload_params,
)
from loadtest.runner.engines import reset_prefix_caches, wait_idle
from loadtest.runner.run import RunOptions, RunResult, run_workload
from loadtest.workloads import Workload

log = logging.getLogger(__name__)
DIRECT = "direct-round-robin"


async def reset_fleet(engines: Sequence[str], idle_timeout_s: float = 30.0) -> None:
    """Wait for the previous arm's requests to drain, then empty every engine's prefix cache."""
    async with httpx.AsyncClient(trust_env=False) as client:
        await wait_idle(client, list(engines), idle_timeout_s)
        await reset_prefix_caches(client, list(engines))


async def compare(workload: Workload, arms: Mapping[str, str | Sequence[str]], engines: Sequence[str],
                  options: RunOptions | None = None, *, direct_round_robin: bool = False, reset: bool = True,
                  out_dir: Path | None = None, title: str | None = None) -> list[RunResult]:
    """Run ``workload`` once per arm (name -> router URL, or a list of engine URLs taken in turn).

    ``direct_round_robin`` adds a first arm sending straight to ``engines`` in turn.
    ``reset`` empties the engines' prefix caches before each arm. With ``out_dir``, writes
    ``compare.json``, ``compare.md`` and ``compare-*.png`` there.
    """
    plan: list[tuple[str, str | Sequence[str]]] = [(DIRECT, list(engines))] if direct_round_robin else []
    plan += list(arms.items())
    base = options or RunOptions()
    results = []
    for name, target in plan:
        if reset and engines:
            await reset_fleet(engines)
        log.info("arm %s: %d requests of %s", name, workload.n_requests, workload.name)
        opts = RunOptions(**{**base.__dict__, "engines": list(engines) or base.engines})
        results.append(await run_workload(workload, target, opts, name=name))
    if out_dir is not None:
        from loadtest.report import write_report

        write_report(results, Path(out_dir) / "compare.json", title=title or "Comparison")
    return results


async def compare_many(workloads: Sequence[Workload], arms: Mapping[str, str | Sequence[str]],
                       engines: Sequence[str], options: RunOptions | None = None, *, direct_round_robin: bool = False,
                       reset: bool = True, out_dir: Path | None = None,
                       title: str | None = None) -> dict[str, list[RunResult]]:
    """``compare`` for each workload in turn; with ``out_dir``: ``<workload>/compare.*`` and ``summary.md``."""
    by_workload: dict[str, list[RunResult]] = {}
    for workload in workloads:
        sub = None if out_dir is None else Path(out_dir) / workload.name
        by_workload[workload.name] = await compare(
            workload, arms, engines, options, direct_round_robin=direct_round_robin, reset=reset, out_dir=sub,
            title=f"{title or 'Comparison'}: {workload.name}")
    if out_dir is not None:
        from loadtest.report import write_matrix

        write_matrix(by_workload, Path(out_dir), title)
    return by_workload


def _arm(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith("http"):
        raise argparse.ArgumentTypeError(f"expected name=URL, got {text!r}")
    return name, url.rstrip("/")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest compare", description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=_arm, action="append", default=[], metavar="NAME=URL",
                        help="an arm: a router (or policy) by name and base URL; repeat for more")
    parser.add_argument("--direct-round-robin", action="store_true",
                        help="add an arm that sends straight to the engines in turn (no proxy)")
    parser.add_argument("--no-reset", action="store_true", help="do not reset the engines' caches between arms")
    parser.add_argument("--out", type=Path, required=True,
                        help="directory for compare.json, compare.md, PNGs (several workloads: one folder each "
                             "plus summary.md)")
    add_workload_args(parser, many=True)
    add_run_args(parser)
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.engines:
        parser.error("--engines URL... is required (to reset caches and read engine metrics)")
    if not args.target and not args.direct_round_robin:
        parser.error("give at least one --target NAME=URL or --direct-round-robin")
    engines = [e.rstrip("/") for e in args.engines]

    names: list[str] = list(dict.fromkeys(args.workload))

    async def go() -> dict[str, list[RunResult]]:
        workloads = [await prepare_workload(n, args.seed, engines, **workload_params(args)) for n in names]
        opts = run_options(args, engines)
        if len(workloads) == 1:
            results = await compare(workloads[0], dict(args.target), engines, opts,
                                    direct_round_robin=args.direct_round_robin, reset=not args.no_reset,
                                    out_dir=args.out)
            return {names[0]: results}
        return await compare_many(workloads, dict(args.target), engines, opts,
                                  direct_round_robin=args.direct_round_robin, reset=not args.no_reset, out_dir=args.out)

    by_workload = asyncio.run(go())
    from loadtest.report import print_matrix, print_table

    for results in by_workload.values():
        print_table(results)
    if len(by_workload) > 1:
        print_matrix(by_workload)
        print(f"wrote {args.out}/summary.md and {args.out}/<workload>/compare.*")
    else:
        print(f"wrote {args.out}/compare.json, compare.md and compare-*.png")
    return 0 if all(r.summary["ok"] for rs in by_workload.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
