"""Router overhead: wrk against the fastest possible backend, direct and through proxies.

``python -m loadtest overhead`` starts nginx answering every POST with a fixed completion
body (the fastest backend there is), then drives it with wrk (a Lua script posting
completion or chat requests whose prompts share a long prefix and end in a unique tail)
directly, through an nginx proxy, through cache-router (in-process index, Redis index) and
through sglang-router (``cache_aware``) when it is installed. The streaming variant does
the same through one simulated vLLM engine in zero-delay mode (``stream: true``, SSE
chunks). While each target is loaded, a probe loop measures its ``/health`` latency.

Every target runs for the whole benchmark and the runs are interleaved (repeat 1 of every
target, then repeat 2, ...), so a noisy machine hits them alike; each cell is the median of
``--repeats`` runs; ratios are to the nginx proxy and sglang-router of the same run.
A target ``name:N`` runs N router worker processes (``serve --workers N``).
Loopback only; every run is bounded by ``--duration``.

nginx and wrk come from Debian's packages (installed with apt-get when missing and root);
sglang-router from PyPI into ``.venv-bench`` (``--install-sglang``), given the project's
tokenizer directory since it cannot download one here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtest.bench import targets as tg
from loadtest.bench.probe import HealthProbe, ProbeStats, outcome_totals, stage_means_us, stage_totals
from loadtest.bench.procs import free_port, install_debian, tree_cpu_seconds
from loadtest.bench.prompts import chat_body, completion_body
from loadtest.bench.wrk import Cell, run_wrk

ROUTERS = ("cache-router", "cache-router-redis")
QUICK = {"sizes": "100,2000", "chat": False, "stream_sizes": "100", "duration": 3.0, "repeats": 1,
         "targets": "direct,nginx,cache-router,sglang-router"}


@dataclass
class Row:
    label: str
    path: str
    body: str
    backend: str
    """``nginx`` (fixed JSON answer) or ``sim`` (a simulated engine streaming SSE)."""


@dataclass
class Result:
    cell: Cell
    health: ProbeStats | None = None
    liveness: ProbeStats | None = None
    """cache-router only: /health on its liveness port (``--health-port``, answered from a thread)."""
    runs: list[Cell] = field(default_factory=list)
    cpu_us: float | None = None
    """CPU time the target's processes spent per answered request (median of the runs)."""
    stages_us: dict[str, float] = field(default_factory=dict)
    """cache-router only: mean µs per stage (its own histograms) over this row's runs."""
    paced: Cell | None = None
    """Latency below saturation: ``--paced-rps`` offered over the same connections (medians)."""
    outcomes: dict[str, float] = field(default_factory=dict)
    """cache-router only: its answers in this row other than ok, by outcome (what wrk's errors were)."""


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores ({cpu}), load average at start {load}"


def rows_of(args: argparse.Namespace) -> list[Row]:
    sizes = [int(s) for s in args.sizes.split(",") if s]
    rows = [Row(f"completion {s} tok", "/v1/completions", completion_body(s), "nginx") for s in sizes]
    if args.chat:
        rows.append(Row("chat 2000 tok", "/v1/chat/completions", chat_body(2000), "nginx"))
    for s in (int(x) for x in args.stream_sizes.split(",") if x):
        rows.append(Row(f"stream {s} tok, {args.stream_tokens} out (sim)", "/v1/completions",
                        completion_body(s, max_tokens=args.stream_tokens, stream=True), "sim"))
    return rows


def _workers(target: str) -> tuple[str, int]:
    name, _, n = target.partition(":")
    return name, int(n or 1)


Started = tuple[str, int | None, str | None]
"""A target's URL, the pid whose process tree is the target (for its CPU time), its liveness URL."""


def _start(stack: contextlib.ExitStack, target: str, backend: str, proxy: str, args: argparse.Namespace,
           tmp: Path) -> Started | None:
    """Start ``target`` in front of ``backend``; None when it is not available."""
    name, workers = _workers(target)
    extra = [*args.router_arg, *(["--workers", str(workers)] if workers > 1 else [])]
    if name == "direct":
        return backend, None, None
    if name == "nginx":
        return proxy, None, None
    if name == "cache-router":
        url, p, live = stack.enter_context(tg.router_proc(backend, *extra, tmp=tmp, config=args.router_config))
        return url, p.pid, live
    if name == "cache-router-redis":
        redis_url = stack.enter_context(tg.redis_proc())
        url, p, live = stack.enter_context(tg.router_proc(backend, "--redis-url", redis_url, *extra, tmp=tmp,
                                                          config=args.router_config))
        return url, p.pid, live
    if name == "sglang-router":
        started = stack.enter_context(tg.sglang_proc(backend))
        return None if started is None else (started[0], started[1].pid, None)
    raise SystemExit(f"unknown target {target!r}")


Run = tuple[Cell, ProbeStats, float | None, ProbeStats | None]


def _probed_run(started: Started, path: str, body: Path, args: argparse.Namespace) -> Run:
    """One wrk run with /health probe loops beside it (main port, liveness port); and the
    target's CPU µs per request."""
    url, pid, live = started
    cpu0 = tree_cpu_seconds(pid) if pid is not None else None
    with HealthProbe(url + "/health") as probe, contextlib.ExitStack() as stack:
        live_probe = stack.enter_context(HealthProbe(live)) if live is not None else None
        cell = run_wrk(url, path, body, connections=args.connections, duration=args.duration, threads=args.threads)
    cpu1 = tree_cpu_seconds(pid) if pid is not None else None
    cpu_us = (cpu1 - cpu0) * 1e6 / cell.requests if cpu0 is not None and cpu1 is not None and cell.requests else None
    return cell, probe.stats(), cpu_us, live_probe.stats() if live_probe is not None else None


def _worst(stats: list[ProbeStats]) -> ProbeStats:
    return max(stats, key=lambda h: h.p99_ms if not math.isnan(h.p99_ms) else -1)


def _measure(rows: list[Row], targets: list[str], backend: str, proxy: str, args: argparse.Namespace,
             tmp: Path) -> dict[str, dict[str, Result]]:
    out: dict[str, dict[str, Result]] = {r.label: {} for r in rows}
    with contextlib.ExitStack() as stack:
        urls = {t: u for t in targets if (u := _start(stack, t, backend, proxy, args, tmp)) is not None}
        for i, row in enumerate(rows):
            body = tmp / f"row{i}.json"
            body.write_text(row.body)

            for url, _, _ in urls.values():  # warm-up: pools, tokenizer caches, first-request costs
                run_wrk(url, row.path, body, connections=args.connections, duration=1, threads=args.threads)
            runs: dict[str, list[Run]] = {t: [] for t in urls}
            # one process only: with N workers each scrape lands on any of them, deltas would mix
            routers = [t for t in urls if _workers(t)[0] in ROUTERS and _workers(t)[1] == 1]
            before = {t: stage_totals(urls[t][0]) for t in routers}
            outcomes_before = {t: outcome_totals(urls[t][0]) for t in routers}
            for _ in range(args.repeats):
                for t, started in urls.items():
                    runs[t].append(_probed_run(started, row.path, body, args))
            stages = {t: stage_means_us(before[t], stage_totals(urls[t][0])) for t in routers}
            paced: dict[str, list[Cell]] = {t: [] for t in urls}
            # Streamed rows' simulated engine saturates near such rates itself: nginx rows only.
            for _ in range(args.repeats if args.paced_rps and row.backend == "nginx" else 0):
                for t, (url, _, _) in urls.items():
                    paced[t].append(run_wrk(url, row.path, body, connections=args.connections,
                                            duration=args.duration, threads=args.threads, rate=args.paced_rps))
            # wrk counts errors; the router's own counter says what they were. "cancelled" is
            # normal: each wrk run ends by closing its connections with requests in flight.
            outcomes = {t: {k: v - outcomes_before[t].get(k, 0.0) for k, v in outcome_totals(urls[t][0]).items()
                            if k != "ok" and v > outcomes_before[t].get(k, 0.0)} for t in routers}
            for t, rs in runs.items():
                cells = [c for c, _, _, _ in rs]
                cpus = [u for _, _, u, _ in rs if u is not None]
                med = Cell(statistics.median(c.rps for c in cells), statistics.median(c.p50_ms for c in cells),
                           statistics.median(c.p99_ms for c in cells), sum(c.errors for c in cells),
                           sum(c.requests for c in cells))
                health = _worst([h for _, h, _, _ in rs])
                lives = [lv for _, _, _, lv in rs if lv is not None]
                out[row.label][t] = Result(med, health, _worst(lives) if lives else None, cells,
                                           statistics.median(cpus) if cpus else None, stages.get(t, {}),
                                           _median_cell(paced[t]), outcomes.get(t, {}))
                print(f"  {row.label:32} {t:22} {med.rps:9,.0f} req/s  p50 {med.p50_ms:7.2f} ms  "
                      f"p99 {med.p99_ms:7.2f} ms  /health p99 {health.p99_ms:6.1f} ms"
                      + (f" (liveness port {out[row.label][t].liveness.p99_ms:.1f})"  # type: ignore[union-attr]
                         if out[row.label][t].liveness else "")
                      + (f"  CPU {statistics.median(cpus):6.0f} us/req" if cpus else ""), flush=True)
                failed = {k: int(v) for k, v in outcomes.get(t, {}).items() if k != "cancelled"}
                if failed:
                    print(f"  {'':32} {t:22} answers not ok in this row (saturated and paced): {failed}", flush=True)
    return out


def _median_cell(cells: list[Cell]) -> Cell | None:
    if not cells:
        return None
    return Cell(statistics.median(c.rps for c in cells), statistics.median(c.p50_ms for c in cells),
                statistics.median(c.p99_ms for c in cells), sum(c.errors for c in cells), sum(c.requests for c in cells))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,2000,8000,32000", help="prompt sizes in tokens (comma-separated)")
    ap.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True, help="also a 2k-token chat row")
    ap.add_argument("--stream-sizes", default="100,2000", help="streaming rows through a simulated engine ('' = none)")
    ap.add_argument("--stream-tokens", type=int, default=16, help="max_tokens (SSE chunks) per streamed answer")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paced-rps", type=float, default=400.0,
                    help="also measure latency with this many requests/s offered over the same connections "
                         "(below every target's saturation: the added latency of one request); 0 = skip")
    ap.add_argument("--targets", default="direct,nginx,cache-router,cache-router-redis,sglang-router",
                    help="comma-separated; NAME:N runs N router workers")
    ap.add_argument("--router-arg", action="append", default=[], help="extra flag for cache-router serve")
    ap.add_argument("--router-config", type=Path, help="YAML appended to the benchmark's router config "
                    "(e.g. 'proxy: {client: httpx}' to compare upstream clients)")
    ap.add_argument("--quick", action="store_true",
                    help="a one-minute look: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    ap.add_argument("--install-sglang", action="store_true", help="pip install sglang-router into .venv-bench")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)

    install_debian({"nginx": "nginx", "wrk": "wrk", "redis-server": "redis-server"})
    if args.install_sglang and not (tg.SGLANG_VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(tg.SGLANG_VENV)], check=True)
        subprocess.run([str(tg.SGLANG_VENV / "bin" / "pip"), "install", "-q", "sglang-router"], check=True)
    targets = args.targets.split(",")
    rows = rows_of(args)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    where = machine()
    print(f"{started}, {where}", flush=True)
    results: dict[str, dict[str, Result]] = {}
    with tempfile.TemporaryDirectory(prefix="cr-overhead-") as tmpdir:
        tmp = Path(tmpdir)
        backend_port, proxy_port, sim_proxy_port = free_port(), free_port(), free_port()
        plain = [r for r in rows if r.backend == "nginx"]
        streamed = [r for r in rows if r.backend == "sim"]
        if plain:
            with tg.nginx_proc(tmp, backend_port, {proxy_port: f"127.0.0.1:{backend_port}"}) as backend:
                results.update(_measure(plain, targets, backend, f"http://127.0.0.1:{proxy_port}", args, tmp))
        if streamed:
            with tg.sim_engine() as sim:
                host_port = sim.removeprefix("http://")
                with tg.nginx_proc(tmp, free_port(), {sim_proxy_port: host_port}):
                    results.update(_measure(streamed, targets, sim, f"http://127.0.0.1:{sim_proxy_port}", args, tmp))
    print_table(results, targets, args, f"{started}, {where}")
    if args.json:
        args.json.write_text(json.dumps({"date": started, "machine": where, "args": vars(args) | {"json": None},
                                         "results": {r: {t: asdict(x) for t, x in cells.items()}
                                                     for r, cells in results.items()}}, indent=2, default=str))
    return 0


def _ratio(a: Result | None, b: Result | None) -> str:
    return f"{a.cell.rps / b.cell.rps:.2f}" if a and b and b.cell.rps else "n/a"


def print_table(results: dict[str, dict[str, Result]], targets: list[str], args: argparse.Namespace,
                header: str) -> None:
    print(f"\n{header}\nwrk -t{args.threads} -c{args.connections} -d{args.duration:g}s, "
          f"median of {args.repeats} interleaved runs; req/s (p50 / p99 ms)\n")
    routers = [t for t in targets if _workers(t)[0] in ROUTERS]
    ratio_cols = [f"{r}/nginx" for r in routers[:1]] + [f"{r}/sglang" for r in routers]
    print("| prompt | " + " | ".join(targets) + " | " + " | ".join(ratio_cols)
          + " | added p50 ms (router - direct) |")
    print("|" + "---|" * (len(targets) + len(ratio_cols) + 2))
    for label, cells in results.items():
        parts = []
        for t in targets:
            r = cells.get(t)
            parts.append("n/a" if r is None else f"{r.cell.rps:,.0f} ({r.cell.p50_ms:.2f} / {r.cell.p99_ms:.2f})"
                         + (f" **{r.cell.errors} err**" if r.cell.errors else ""))
        ratios = [_ratio(cells.get(r), cells.get("nginx")) for r in routers[:1]]
        ratios += [_ratio(cells.get(r), cells.get("sglang-router")) for r in routers]
        first, direct = (cells.get(routers[0]) if routers else None), cells.get("direct")
        added = f"{first.cell.p50_ms - direct.cell.p50_ms:.2f}" if first and direct else "n/a"
        print(f"| {label} | " + " | ".join(parts) + " | " + " | ".join(ratios) + f" | {added} |")
    if any(r.paced for cells in results.values() for r in cells.values()):
        print(f"\nLatency below saturation: about {args.paced_rps:,.0f} requests/s offered over the same "
              f"{args.connections} connections (wrk pacing each with a random 0-2x mean delay); "
              "achieved req/s, p50 / p99 ms, and each target's p50 minus direct's:\n")
        print("| prompt | " + " | ".join(targets) + " | " + " | ".join(f"added p50 {t}" for t in targets
                                                                   if t != "direct") + " |")
        print("|" + "---|" * (2 * len(targets) + ("direct" not in targets)))
        for label, cells in results.items():
            pc = {t: cells[t].paced for t in targets if t in cells}
            base = pc.get("direct")
            parts = ["n/a" if c is None else f"{c.rps:,.0f} ({c.p50_ms:.2f} / {c.p99_ms:.2f})"
                     + (f" **{c.errors} err**" if c.errors else "") for c in (pc.get(t) for t in targets)]
            added = [f"{c.p50_ms - base.p50_ms:+.2f}" if c is not None and base is not None else "n/a"
                     for t in targets if t != "direct" for c in (pc.get(t),)]
            print(f"| {label} | " + " | ".join(parts) + " | " + " | ".join(added) + " |")
    print("\nCPU time of the target's processes per answered request (µs; what it costs, whatever share "
          "of the cores it got):\n")
    measured = [t for t in targets if any(c.get(t) and c[t].cpu_us for c in results.values())]
    print("| prompt | " + " | ".join(measured) + " |")
    print("|" + "---|" * (len(measured) + 1))
    for label, cells in results.items():
        print(f"| {label} | " + " | ".join(f"{cells[t].cpu_us:,.0f}" if t in cells and cells[t].cpu_us else "n/a"
                                          for t in measured) + " |")
    stage_names = ["parse", "render", "tokenize", "hash", "lookup", "score", "proxy_connect"]
    for t in (t for t in targets if _workers(t)[0] in ROUTERS and _workers(t)[1] == 1):
        print(f"\n{t}: its own stage histograms, mean µs per request over each row's runs:\n")
        print("| prompt | " + " | ".join(stage_names) + " |")
        print("|" + "---|" * (len(stage_names) + 1))
        for label, cells in results.items():
            st = cells[t].stages_us if t in cells else {}
            print(f"| {label} | " + " | ".join(f"{st[n]:,.0f}" if n in st else "-" for n in stage_names) + " |")
    print("\n/health under that load (a new connection every 20 ms; worst p99 of the repeats, ms):\n")
    print("| prompt | " + " | ".join(targets) + " |")
    print("|" + "---|" * (len(targets) + 1))
    for label, cells in results.items():
        parts = []
        for t in targets:
            r = cells.get(t)
            h = r.health if r else None
            parts.append("n/a" if h is None or h.n == 0 else f"{h.p99_ms:.1f} (max {h.max_ms:.1f})"
                         + (f" {h.failures} failed" if h.failures else ""))
            lv = r.liveness if r else None
            if lv is not None and lv.n:
                parts[-1] += f"; liveness port {lv.p99_ms:.1f} (max {lv.max_ms:.1f})" + (
                    f" {lv.failures} failed" if lv.failures else "")
        print(f"| {label} | " + " | ".join(parts) + " |")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
