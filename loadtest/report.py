"""Reports of one run or of a comparison: JSON, a Markdown page, a rich table and PNG plots.

A single run is a comparison of one arm, so both go through the same code. Plots use
matplotlib's Agg backend (no display needed): the TTFT CDF per arm, requests and busy
share per engine per arm, and hit rate per arm beside the ceiling.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from loadtest.runner.run import RunResult

COLUMNS = ("arm", "ok/sent", "errors", "hit rate", "hit (engine ctr)", "ceiling", "of ceiling",
           "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "E2E p99 ms", "req/s", "out tok/s", "load max/mean",
           "busy max/mean")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{1000 * x:.0f}" if x >= 0.1 else f"{1000 * x:.1f}" if x >= 0.001 else f"{1000 * x:.2f}"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def row(result: RunResult) -> list[str]:
    s = result.summary
    errors = ", ".join(f"{k}:{v}" for k, v in sorted(s["errors"].items())) or "0"
    return [result.name, f"{s['ok']}/{s['requests']}", errors, _pct(s["hit_rate_usage"]),
            _pct(s["hit_rate_counters"]), _pct(s["ceiling"]), _pct(s["of_ceiling"]),
            _ms(s["ttft_s"]["p50"]), _ms(s["ttft_s"]["p99"]), _ms(s["itl_s"]["p50"]), _ms(s["e2e_s"]["p99"]),
            _num(s["throughput_rps"], "{:.1f}"), _num(s["output_tokens_per_s"], "{:.0f}"),
            _num(s["load_balance"]), _num(s["busy_balance"])]


def print_table(results: Sequence[RunResult]) -> None:
    """The table on stdout, wide enough to stay readable when piped to a file."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=220)
    console.print(rich_table(results))


def rich_table(results: Sequence[RunResult]) -> Table:
    first = results[0]
    table = Table(title=f"{first.workload} (seed {first.seed}, {first.summary['requests']} requests, {first.arrival})")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "arm" else "right")
    for result in results:
        table.add_row(*row(result))
    return table


def markdown_table(results: Sequence[RunResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if c == "arm" else "---:" for c in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    return "\n".join(lines)


def _engine_table(results: Sequence[RunResult]) -> str:
    urls: list[str] = []
    for r in results:
        urls += [u for u in r.summary["engine_requests"] if u not in urls]
        urls += [u for u in r.summary["engine_busy"] if u not in urls]
    if not urls:
        return "_No engine was read: pass `--engines URL...` to get engine-side figures._"
    head = "| engine | " + " | ".join(f"{r.name} requests | busy | hit" for r in results) + " |"
    lines = [head, "|---|" + "---:|---:|---:|" * len(results)]
    for url in urls:
        cells = []
        for r in results:
            req = r.summary["engine_requests"].get(url)
            busy = r.summary["engine_busy"].get(url)
            usage = next((e for e in r.engines if e.url.rstrip("/") == url), None)
            hit = usage.hits / usage.queries if usage is not None and usage.queries else None
            cells += ["-" if req is None else f"{req:.0f}", "-" if busy is None else f"{busy:.2f}", _pct(hit)]
        lines.append(f"| {url} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: Sequence[RunResult], images: Sequence[Path], title: str | None = None) -> str:
    first = results[0]
    params = ", ".join(f"{k}={v}" for k, v in first.workload_params.items() if v is not None)
    opts = first.options
    mode = (f"rate {opts['rate']}/s" if first.arrival == "poisson" else
            f"concurrency {opts['concurrency'] or 8}" if first.arrival == "closed" else "trace timestamps")
    out = [f"# {title or 'Load test'}", "",
           f"- Workload `{first.workload}`, seed {first.seed}: {params}.",
           f"- Started {first.started_at}; api `{opts['api']}`, {'streaming' if opts['stream'] else 'non-streaming'}; "
           f"arrivals: {mode}; limits: {opts['max_requests'] or 'all'} requests"
           + (f", {opts['duration_s']} s." if opts["duration_s"] else ", no duration limit."),
           f"- Ceiling: one unlimited prefix cache on the same requests, block size {first.block_size}, "
           "last prompt token always recomputed.", "",
           markdown_table(results), "",
           "**Reading it.** *hit rate* is cached / prompt tokens from the engines' `usage`; *hit (engine ctr)* is "
           "the same from the engines' `vllm:prefix_cache_*` counters (they include every client of those engines). "
           "*of ceiling* is hit rate / ceiling. *load max/mean* is the busiest engine's requests over the mean "
           "(1.00 is perfect balance); *ITL p50* near 0 means tokens arrive in bursts, several per network read; "
           "*busy max/mean* the same for requests running or waiting, sampled. "
           "Per engine, *busy* is the mean number of requests running or waiting there and *hit* its own "
           "counters' hit rate.", "",
           "## Per engine", "", _engine_table(results), ""]
    predicted = [r for r in results if r.summary.get("predicted_requests")]
    if predicted:
        out += ["## Router predictions", "",
                "| arm | requests with a prediction | predicted tokens | engine-cached tokens | stale (predicted > cached) |",
                "|---|---:|---:|---:|---:|"]
        for r in predicted:
            s = r.summary
            stale = s["stale_predictions"] / s["predicted_requests"]
            out.append(f"| {r.name} | {s['predicted_requests']} | {s['predicted_tokens']} | "
                       f"{s['predicted_cached_tokens']} | {s['stale_predictions']} ({_pct(stale)}) |")
        out.append("")
    late = [r.name for r in results if (r.summary.get("late_s", {}).get("p99") or 0.0) > 0.010]
    if late:
        out += [f"**Warning:** in {late} the generator sent 1% of requests more than 10 ms after their "
                "scheduled arrival (see `late_s` in the JSON); latencies are timed from the real send, so they "
                "understate what clients arriving on time would see.", ""]
    busy_client = [r.name for r in results if r.summary.get("client_cpu_share", 0.0) > 0.8]
    if busy_client:
        out += [f"**Warning:** the load generator used more than 80% of a core during {busy_client}; its "
                "latencies include its own queueing. Use a lower rate or concurrency, or another machine.", ""]
    mismatches = {r.name: r.summary.get("token_count_mismatches", 0) for r in results}
    if any(mismatches.values()):
        out += [f"**Warning:** the engines counted prompt tokens differently from the local tokenizer for "
                f"{mismatches} requests, so the ceiling may be off for those.", ""]
    out += [f"![{p.stem}]({p.name})" for p in images]
    return "\n".join(out) + "\n"


def plot_ttft_cdf(results: Sequence[RunResult], path: Path) -> Path:
    """TTFT CDF per arm; end-to-end latency instead when no arm streamed (then labelled so)."""
    streamed = any(x.ttft_s is not None for r in results for x in r.records)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        times = [x.ttft_s if streamed else x.e2e_s for x in r.records if x.ok]
        values = sorted(1000 * t for t in times if t is not None)
        if values:
            ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=r.name)
    ax.set_xlabel("time to first token (ms)" if streamed else "end-to-end latency, non-streaming (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF" if streamed else "Latency CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_engine_load(results: Sequence[RunResult], path: Path) -> Path:
    urls = sorted({u for r in results for u in r.summary["engine_requests"]})
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(results))
    x = np.arange(len(urls))
    for i, r in enumerate(results):
        ax.bar(x + i * width, [r.summary["engine_requests"].get(u, 0) for u in urls], width, label=r.name)
    ax.set_xticks(x + width * (len(results) - 1) / 2, [u.rsplit(":", 1)[-1] for u in urls], fontsize=8)
    ax.set_xlabel("engine (port)")
    ax.set_ylabel("requests")
    ax.set_title("Requests per engine")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_hit_rate(results: Sequence[RunResult], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r.name for r in results]
    hits = [100 * (r.summary["hit_rate_usage"] or 0.0) for r in results]
    bars = ax.bar(names, hits, color="tab:blue", label="hit rate (usage)")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ceilings = [r.summary["ceiling"] for r in results if r.summary["ceiling"] is not None]
    if ceilings:
        ax.axhline(100 * max(ceilings), color="tab:red", linestyle="--", label="ceiling")
    ax.set_ylabel("prompt tokens served from cache (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Hit rate by policy")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_report(results: Sequence[RunResult], out_json: Path, title: str | None = None,
                 records: bool = True) -> dict[str, Path]:
    """``out_json`` (all arms), a Markdown report beside it and three PNGs sharing its stem."""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    stem = out_json.with_suffix("")
    arms = [r.to_dict(records=records) for r in results]
    data: Any = arms[0] if len(arms) == 1 else {"arms": arms}
    out_json.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    images = [plot_ttft_cdf(results, Path(f"{stem}-ttft.png")),
              plot_engine_load(results, Path(f"{stem}-engines.png")),
              plot_hit_rate(results, Path(f"{stem}-hit-rate.png"))]
    md = out_json.with_suffix(".md")
    md.write_text(markdown(results, images, title))
    return {"json": out_json, "markdown": md, "ttft": images[0], "engines": images[1], "hit_rate": images[2]}


MATRIX_COLUMNS = ("workload", "arm", "hit rate", "ceiling", "of ceiling", "TTFT p99 ms", "p99 per round ms",
                  "E2E p99 ms", "req/s", "load max/mean", "errors")


def _rounds_p99(summary: Mapping[str, Any]) -> str:
    """Several rounds: the median of the per-round TTFT p99s and their range; one round: "-"."""
    p99s = [p for p in summary.get("ttft_p99_rounds") or [] if p is not None]
    if len(p99s) < 2:
        return "-"
    return f"{1000 * statistics.median(p99s):.0f} [{1000 * min(p99s):.0f}-{1000 * max(p99s):.0f}]"


def matrix_rows(by_workload: Mapping[str, Sequence[RunResult]]) -> list[list[str]]:
    """One row per (workload, arm): the figures a README table needs."""
    rows = []
    for workload, results in by_workload.items():
        for r in results:
            s = r.summary
            rows.append([workload, r.name, _pct(s["hit_rate_usage"]), _pct(s["ceiling"]), _pct(s["of_ceiling"]),
                         _ms(s["ttft_s"]["p99"]), _rounds_p99(s), _ms(s["e2e_s"]["p99"]), _num(s["throughput_rps"], "{:.1f}"),
                         _num(s["load_balance"]), str(s["requests"] - s["ok"])])
    return rows


def plot_matrix_hit_rate(by_workload: Mapping[str, Sequence[RunResult]], path: Path) -> Path:
    """Hit rate by policy for every workload: grouped bars, the ceiling as a black tick per workload."""
    workloads = list(by_workload)
    arms = list(dict.fromkeys(r.name for rs in by_workload.values() for r in rs))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(workloads)), 4))
    width = 0.8 / max(1, len(arms))
    x = np.arange(len(workloads))
    for i, arm in enumerate(arms):
        values = [100 * next((r.summary["hit_rate_usage"] or 0.0 for r in by_workload[w] if r.name == arm), 0.0)
                  for w in workloads]
        ax.bar(x + i * width, values, width, label=arm)
    ceilings = [100 * max((r.summary["ceiling"] or 0.0) for r in by_workload[w]) for w in workloads]
    ax.hlines(ceilings, x - width / 2, x + width * (len(arms) - 0.5), colors="black", label="ceiling")
    ax.set_xticks(x + width * (len(arms) - 1) / 2, workloads, fontsize=8)
    ax.set_ylabel("prompt tokens served from cache (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Hit rate by policy and workload")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_matrix(by_workload: Mapping[str, Sequence[RunResult]], out_dir: Path, title: str | None = None) -> Path:
    """``summary.md`` and ``summary-hit-rate.png`` over several workloads' comparisons."""
    out_dir.mkdir(parents=True, exist_ok=True)
    image = plot_matrix_hit_rate(by_workload, out_dir / "summary-hit-rate.png")
    lines = [f"# {title or 'Comparison across workloads'}", "",
             "| " + " | ".join(MATRIX_COLUMNS) + " |", "|---|---|" + "---:|" * (len(MATRIX_COLUMNS) - 2)]
    lines += ["| " + " | ".join(row) + " |" for row in matrix_rows(by_workload)]
    lines += ["", "Each workload's full report: `<workload>/compare.md`.", "", f"![hit rate]({image.name})", ""]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines))
    return path


def print_matrix(by_workload: Mapping[str, Sequence[RunResult]]) -> None:
    table = Table(title="Comparison across workloads")
    for col in MATRIX_COLUMNS:
        table.add_column(col, justify="left" if col in ("workload", "arm") else "right")
    for row in matrix_rows(by_workload):
        table.add_row(*row)
    console = Console()
    (console if console.is_terminal else Console(width=160)).print(table)


def load_results(path: Path) -> list[RunResult]:
    data = orjson.loads(path.read_bytes())
    return [RunResult.from_dict(d) for d in data["arms"]] if "arms" in data else [RunResult.from_dict(data)]
