"""Builds deploy/grafana/dashboards/cache-router.json: the cache-router Grafana dashboard.

Run ``python deploy/grafana/dashboard.py`` after changing a panel (it also writes the copy
the Kubernetes base provisions); a test checks the JSON is
up to date and that every expression in it returns data from a real Prometheus scraping a
router under load. Every metric name is one of ``router/metrics.py``'s (with Prometheus'
``_total`` / ``_bucket`` suffixes). Each row answers one operator question, stated in its
title and in docs/deploy.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "cache-router.json"
K8S_COPY = Path(__file__).resolve().parent.parent / "k8s" / "grafana" / "cache-router.json"  # kustomize reads only its folder
RI = "$__rate_interval"
DS = {"type": "prometheus", "uid": "${datasource}"}

# Event-driven counters have no series until their event happens: "or ... * 0" shows a truthful 0
# beside a denominator that exists, instead of an empty panel.
REQ = "cache_router_requests_total"
ERR = 'outcome=~"upstream_error|timeout|no_backend|rejected"'
NB = 'backend!=""'  # requests that reached a replica (no_backend ones have backend="")


def rate(metric: str, by: str, sel: str = "") -> str:
    return f"sum by ({by}) (rate({metric}{{{sel}}}[{RI}]))" if sel else f"sum by ({by}) (rate({metric}[{RI}]))"


def quantile(q: float, metric: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) (rate({metric}_bucket[{RI}])))"


def ratio_or_zero(num: str, den: str) -> str:
    return f"({num} or {den} * 0) / {den}"


ROWS: list[tuple[str, list[dict[str, Any]]]] = [
    ("Traffic and errors by replica: is every replica serving, and who fails?", [
        {"title": "Requests/s by replica", "targets": [(rate(REQ, "backend"), "{{backend}}")]},
        {"title": "Requests/s by outcome", "targets": [(rate(REQ, "outcome"), "{{outcome}}")]},
        {"title": "Error ratio by replica", "unit": "percentunit", "targets": [
            (ratio_or_zero(rate(REQ, "backend", ERR), rate(REQ, "backend")), "{{backend}}")]},
        {"title": "Retries and broken streams/s", "targets": [
            (rate("cache_router_retries_total", "reason"), "retry {{reason}}"),
            (rate("cache_router_stream_errors_total", "backend"), "stream error {{backend}}")]},
        {"title": "Admission: queue and rejections", "targets": [
            ("sum(cache_router_admission_queue_depth)", "queued"),
            (rate("cache_router_rejected_total", "reason"), "rejected {{reason}}/s")]},
    ]),
    ("Latency: TTFT and end-to-end percentiles, router overhead", [
        {"title": "TTFT p50 / p90 / p99 by model", "unit": "s", "targets": [
            (quantile(q, "cache_router_ttft_seconds", "model"), f"p{int(q * 100)} {{{{model}}}}")
            for q in (0.5, 0.9, 0.99)]},
        {"title": "Request duration p50 / p99 by model", "unit": "s", "targets": [
            (quantile(q, "cache_router_request_duration_seconds", "model"), f"p{int(q * 100)} {{{{model}}}}")
            for q in (0.5, 0.99)]},
        {"title": "Router time per stage p99", "unit": "s", "targets": [
            (quantile(0.99, "cache_router_stage_seconds", "stage"), "{{stage}}")]},
    ]),
    ("Prefill avoided and hit rate: predicted beside engine-reported", [
        {"title": "Prefill tokens avoided/s (engine-reported cached tokens)", "targets": [
            (rate("cache_router_engine_cached_tokens_total", "model"), "{{model}}")]},
        {"title": "Hit rate: predicted vs engine-reported", "unit": "percentunit", "targets": [
            (f'sum(rate(cache_router_predicted_matched_tokens_total[{RI}])) / sum(rate(cache_router_prompt_tokens_total[{RI}]))',
             "predicted by the index"),
            (f'sum(rate(cache_router_engine_cached_tokens_total[{RI}])) / sum(rate(cache_router_prompt_tokens_total[{RI}]))',
             "reported by the engines")]},
        {"title": "Prompt tokens/s by model", "targets": [
            (rate("cache_router_prompt_tokens_total", "model"), "{{model}}")]},
        # 1 = no tokenizer for the model: keys over characters, token counts are estimates.
        {"title": "Models keyed without a tokenizer (approximate)", "targets": [
            ("max by (model) (cache_router_tokenizer_approximate)", "{{model}}")]},
    ]),
    ("Savings lost, by cause: workload (nobody had it), routing (sent elsewhere), index (promised, not held)", [
        {"title": "Lost cacheable tokens/s by cause", "targets": [
            (rate("cache_router_lost_savings_tokens_total", "cause"), "{{cause}}")]},
        {"title": "Lost savings as a share of prompt tokens", "unit": "percentunit", "targets": [
            (f"{rate('cache_router_lost_savings_tokens_total', 'cause')} / scalar(sum(rate(cache_router_prompt_tokens_total[{RI}])))",
             "{{cause}}")]},
    ]),
    ("Stale hits: does the index promise blocks the engines no longer hold?", [
        {"title": "Stale-hit ratio by replica", "unit": "percentunit", "targets": [
            (ratio_or_zero(rate("cache_router_stale_hits_total", "backend"), rate(REQ, "backend", 'outcome="ok"')),
             "{{backend}}")]},
        {"title": "Stale hits/s by replica", "targets": [
            (rate("cache_router_stale_hits_total", "backend"), "{{backend}}")]},
    ]),
    ("Load balance across replicas: is any replica hot?", [
        {"title": "Share of requests by replica", "unit": "percentunit", "targets": [
            (f'{rate(REQ, "backend", NB)} / scalar(sum(rate({REQ}{{backend!=""}}[{RI}])))',
             "{{backend}}")]},
        {"title": "Busiest replica / mean (1 = even)", "targets": [
            (f'max({rate(REQ, "backend", NB)}) / avg({rate(REQ, "backend", NB)})',
             "max / mean")]},
        {"title": "In flight by replica (this router)", "targets": [
            ("sum by (backend) (cache_router_in_flight)", "{{backend}}")]},
        {"title": "Engine queue and KV usage", "targets": [
            ("max by (backend) (cache_router_engine_waiting)", "waiting {{backend}}"),
            ("max by (backend) (cache_router_engine_kv_usage)", "kv usage {{backend}}")]},
    ]),
    ("Health and circuit state: which replicas are routable?", [
        {"title": "Healthy / circuit open / draining", "targets": [
            ("min by (backend) (cache_router_backend_healthy)", "healthy {{backend}}"),
            ("max by (backend) (cache_router_circuit_open)", "circuit open {{backend}}"),
            ("max by (backend) (cache_router_backend_draining)", "draining {{backend}}")]},
        {"title": "Healthy replicas", "type": "stat", "targets": [
            ("count(max by (backend) (cache_router_backend_healthy) == 1) or vector(0)", "healthy")]},
        {"title": "Engine restarts detected (1h)", "targets": [
            ("sum by (backend) (increase(cache_router_engine_restarts_total[1h]))", "{{backend}}")]},
    ]),
    ("Index size and lookup latency", [
        {"title": "Blocks credited to each replica", "targets": [
            ("max by (backend) (cache_router_index_blocks)", "{{backend}}")]},
        {"title": "Index lookup p50 / p99", "unit": "s", "targets": [
            (quantile(q, "cache_router_index_lookup_seconds", "backend_kind"), f"p{int(q * 100)} {{{{backend_kind}}}}")
            for q in (0.5, 0.99)]},
        {"title": "Block retention in the index p50", "unit": "s", "targets": [
            (quantile(0.5, "cache_router_block_retention_seconds", ""), "p50")]},
    ]),
    ("KV events: lag, gaps, precise mode", [
        {"title": "KV events applied/s by type", "targets": [
            (rate("cache_router_kv_events_total", "type"), "{{type}}")]},
        {"title": "Event lag p50 / p99", "unit": "s", "targets": [
            (quantile(q, "cache_router_kv_event_lag_seconds", ""), f"p{int(q * 100)}") for q in (0.5, 0.99)]},
        {"title": "Gaps, replays, decode errors, block-size mismatches (1h)", "targets": [
            ("sum by (backend) (increase(cache_router_kv_event_gaps_total[1h]))", "gaps {{backend}}"),
            ("sum by (outcome) (increase(cache_router_kv_replays_total[1h]))", "replays {{outcome}}"),
            ("sum by (backend) (increase(cache_router_kv_event_decode_errors_total[1h]))", "decode errors {{backend}}"),
            ("sum by (backend) (increase(cache_router_block_size_mismatch_total[1h]))", "block size mismatch {{backend}}")]},
        {"title": "Replicas in precise mode", "targets": [
            ("max by (backend) (cache_router_precise_mode)", "{{backend}}")]},
    ]),
    ("Redis and index state: is routing failing open?", [
        {"title": "Index degraded (fail-open) by router", "targets": [
            ("max by (instance) (cache_router_index_degraded)", "{{instance}}")]},
        {"title": "Index errors/s by operation", "targets": [
            (rate("cache_router_index_errors_total", "op"), "{{op}}")]},
    ]),
    ("Routing decisions by reason", [
        {"title": "Decisions/s by reason and arm", "targets": [
            (rate("cache_router_decisions_total", "reason, arm"), "{{reason}} ({{arm}})")]},
    ]),
    ("Experiment: cache-aware (main) vs baseline arm on the same traffic", [
        {"title": "Prefill avoided (engine-reported hit rate) by arm", "unit": "percentunit", "targets": [
            (f"{rate('cache_router_engine_cached_tokens_total', 'arm')} / {rate('cache_router_prompt_tokens_total', 'arm')}",
             "{{arm}}")]},
        {"title": "TTFT p50 / p99 by arm", "unit": "s", "targets": [
            (quantile(q, "cache_router_ttft_seconds", "arm"), f"p{int(q * 100)} {{{{arm}}}}") for q in (0.5, 0.99)]},
        {"title": "Load balance by arm: busiest replica / mean", "targets": [
            (f'max by (arm) ({rate(REQ, "arm, backend", NB)}) / '
             f'avg by (arm) ({rate(REQ, "arm, backend", NB)})', "{{arm}}")]},
    ]),
]


def panel(spec: dict[str, Any], pid: int, x: int, y: int, w: int) -> dict[str, Any]:
    kind = spec.get("type", "timeseries")
    return {
        "id": pid, "type": kind, "title": spec["title"], "datasource": DS,
        "gridPos": {"h": 8, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": spec.get("unit", "short")}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}} if kind == "timeseries" else {},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(spec["targets"])],
    }


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for title, specs in ROWS:
        panels.append({"id": pid, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        w = max(6, 24 // len(specs))
        for i, spec in enumerate(specs):
            x = (i * w) % 24
            if i and x == 0:
                y += 8
            panels.append(panel(spec, pid, x, y, w))
            pid += 1
        y += 8
    return {
        "uid": "cache-router", "title": "cache-router", "tags": ["cache-router", "llm", "inference"],
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s",
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0}]},
        "annotations": {"list": []},
        "panels": panels,
    }


def main() -> int:
    text = json.dumps(build(), indent=2) + "\n"
    for out in (OUT, K8S_COPY):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
