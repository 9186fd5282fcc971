"""``python -m loadtest bench-engine``: how many simulated engines and requests/s one core sustains.

The engines run in one ``python -m loadtest engine --zero`` process pinned to CPU 0; the
load comes from ``wrk`` (one process per engine, pinned to CPU 1) posting completion
requests with a shared prefix and a random suffix, so the cache model, hashing, events
and HTTP all do their real work. For each fleet size it prints the idle CPU of the host
(what many idle engines cost), requests/s, the host's CPU share under load, and requests
per CPU-second (what one core sustains). Loopback only; every run is bounded in time.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from loadtest.engine.fleet import SimFleet

_LUA = """
math.randomseed(os.time() + %(seed)d)
local words = {"cache", "route", "block", "prefix", "engine", "token", "queue", "batch", "replica", "model"}
local prefix = string.rep("the shared system prompt says hello to every request ", %(prefix_reps)d)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local suffix = {}
  for i = 1, 12 do suffix[i] = words[math.random(#words)] end
  local body = '{"model":"sim-model","max_tokens":%(max_tokens)d,"stream":%(stream)s,"prompt":"'
    .. prefix .. table.concat(suffix, " ") .. '"}'
  return wrk.format(nil, "/v1/completions", nil, body)
end
"""


def _pin(pid: int, cpu: int) -> None:
    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(pid, {cpu})


def _run_wrk(urls: list[str], args: argparse.Namespace, script: str) -> tuple[float, int]:
    """Run one wrk per engine at once; returns (requests/s summed, non-2xx responses)."""
    conns = max(1, args.connections // len(urls))
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{args.duration}s", "-s", script, "--timeout", "5s"]
    procs = [subprocess.Popen([*cmd, url], stdout=subprocess.PIPE, text=True) for url in urls]
    for p in procs:
        _pin(p.pid, 1)
    rate, errors = 0.0, 0
    for p in procs:
        out, _ = p.communicate(timeout=args.duration + 30)
        if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
            rate += float(m.group(1))
        if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
            errors += int(m.group(1))
        if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
            errors += sum(int(x) for x in m.groups())
    return rate, errors


def _measure(engines: int, args: argparse.Namespace, stream: bool) -> dict[str, float]:
    extra = ["--max-num-seqs", "256"]
    with SimFleet(
        engines, mode="process", zero=True, cache_blocks=args.cache_blocks, extra_args=extra
    ) as fleet:
        assert fleet.proc is not None
        _pin(fleet.proc.pid, 0)
        host = psutil.Process(fleet.proc.pid)
        t0, c0 = time.monotonic(), host.cpu_times()
        time.sleep(args.idle_seconds)
        c1 = host.cpu_times()
        idle = max(0.0, c1.user + c1.system - c0.user - c0.system) / (time.monotonic() - t0)
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
            f.write(
                _LUA
                % {
                    "seed": engines,
                    "prefix_reps": args.prefix_reps,
                    "max_tokens": args.max_tokens,
                    "stream": "true" if stream else "false",
                }
            )
        try:
            t0, c0 = time.monotonic(), host.cpu_times()
            rate, errors = _run_wrk(fleet.urls, args, f.name)
            c1 = host.cpu_times()
            busy = (c1.user + c1.system - c0.user - c0.system) / (time.monotonic() - t0)
        finally:
            Path(f.name).unlink()
        prompt = fleet.stats(0)
    return {
        "engines": engines,
        "idle_cpu": idle,
        "rps": rate,
        "cpu": busy,
        "errors": errors,
        "per_cpu_s": rate / busy if busy else 0.0,
        "hit": prompt["cached_tokens"] / max(prompt["prompt_tokens"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest bench-engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--engines", default="1,4,16", help="fleet sizes to measure, comma separated")
    p.add_argument("--duration", type=int, default=4, help="seconds of load per measurement")
    p.add_argument("--connections", type=int, default=32, help="total client connections")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prefix-reps", type=int, default=8, help="shared prefix length (x ~10 tokens)")
    p.add_argument("--cache-blocks", type=int, default=4096)
    p.add_argument("--idle-seconds", type=float, default=2.0)
    p.add_argument("--no-stream", action="store_true", help="skip the streaming runs")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if shutil.which("wrk") is None:
        print(
            "wrk is not installed (apt-get install wrk); the benchmark needs a client faster than the engines"
        )
        return 2
    print(
        f"simulated engines, zero-delay mode, one host process pinned to 1 CPU; wrk on another; "
        f"{args.connections} connections, {args.duration}s per run, max_tokens={args.max_tokens}"
    )
    print(
        f"load average before: {os.getloadavg()[0]:.2f} (other work on this machine skews req/s; req/CPU-s less so)"
    )
    print(
        f"{'mode':<10}{'engines':>8}{'idle CPU':>10}{'req/s':>10}{'host CPU':>10}{'req/CPU-s':>11}"
        f"{'errors':>8}{'hit rate':>10}"
    )
    for stream in [False] if args.no_stream else [False, True]:
        for n in (int(x) for x in args.engines.split(",")):
            r = _measure(n, args, stream)
            print(
                f"{'stream' if stream else 'json':<10}{n:>8}{r['idle_cpu']:>9.1%}{r['rps']:>10.0f}{r['cpu']:>9.0%}"
                f"{r['per_cpu_s']:>11.0f}{r['errors']:>8.0f}{r['hit']:>10.2f}",
                flush=True,
            )
    print(
        f"load average after: {os.getloadavg()[0]:.2f}; req/CPU-s = requests/s divided by the host's CPU share"
    )
    return 0
