"""Alert rules and dashboard, checked statically: promtool, and every metric and label they name
exists in ``router/metrics.py``. (tests/integration/test_deploy_prometheus.py then evaluates each
expression against a real Prometheus scraping a router under load.)
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from router import metrics

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "cache-router.json"
GENERIC_LABELS = {"instance", "job"}  # added by Prometheus to every scraped series


def exported() -> dict[str, set[str]]:
    """Exposition name -> label names, for every metric router/metrics.py defines."""
    out: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        name, labels, kind = obj._name, set(obj._labelnames), obj._type
        if kind == "counter":
            out[f"{name}_total"] = labels
        elif kind == "histogram":
            out[f"{name}_bucket"] = labels | {"le"}
            out[f"{name}_sum"] = out[f"{name}_count"] = labels
        else:
            out[name] = labels
    return out


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"]]


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) for every query in the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


def grafana_to_promql(expr: str, rate_interval: str = "1m") -> str:
    return expr.replace("$__rate_interval", rate_interval)


METRIC_REF = re.compile(r"\b(cache_router_[a-z0-9_]+)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def problems(expr: str) -> list[str]:
    """Unknown metric names, unknown matcher labels, grouping labels no metric in expr carries."""
    known = exported()
    found: list[str] = []
    refs = METRIC_REF.findall(expr)
    if not refs and "up{" not in expr:
        found.append("names no cache-router metric")
    labels_here: set[str] = set(GENERIC_LABELS)
    for name, selector in refs:
        if name not in known:
            found.append(f"unknown metric {name}")
            continue
        labels_here |= known[name]
        for label in MATCHER.findall(selector or ""):
            if label not in known[name] | GENERIC_LABELS:
                found.append(f"{name} has no label {label}")
    for group in GROUPING.findall(expr):
        for label in filter(None, (g.strip() for g in group.split(","))):
            if label not in labels_here:
                found.append(f"grouping by {label}, which no metric here has")
    return found


def test_alert_and_dashboard_expressions_use_only_router_metrics() -> None:
    exprs = [(r["alert"], r["expr"]) for r in alert_rules()] + dashboard_targets()
    bad = {what: p for what, expr in exprs if (p := problems(expr))}
    assert bad == {}


def test_the_metric_check_catches_typos() -> None:
    assert problems("rate(cache_router_request_total[1m])")  # missing s
    assert problems('sum(cache_router_requests_total{outcom="ok"})')
    assert problems("sum by (replica) (cache_router_in_flight)")
    assert problems("rate(cache_router_ttft_seconds[1m])")  # a histogram has no bare series
    assert not problems('sum by (backend) (rate(cache_router_requests_total{outcome="ok"}[1m]))')


def test_dashboard_json_is_generated_from_its_builder() -> None:
    spec = importlib.util.spec_from_file_location("dashboard", ROOT / "deploy" / "grafana" / "dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert json.loads(DASHBOARD.read_text()) == module.build(), "run: python deploy/grafana/dashboard.py"


def test_dashboard_rows_answer_the_operator_questions() -> None:
    dash = json.loads(DASHBOARD.read_text())
    rows = " | ".join(p["title"].lower() for p in dash["panels"] if p["type"] == "row")
    for topic in ("traffic and errors by replica", "ttft", "prefill avoided", "hit rate", "savings lost",
                  "workload", "routing", "index", "stale hits", "load balance", "health and circuit",
                  "index size and lookup latency", "kv events", "gaps", "redis", "decisions by reason",
                  "experiment"):
        assert topic in rows, f"no dashboard row about {topic}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}"


def test_every_alert_of_the_issue_exists() -> None:
    names = {r["alert"] for r in alert_rules()}
    assert {"CacheRouterDown", "CacheRouterNoHealthyReplica", "CacheRouterModelUnroutable",
            "CacheRouterHighErrorRate", "CacheRouterTTFTHigh", "CacheRouterHitRateDropped",
            "CacheRouterStaleHitsHigh", "CacheRouterKVEventGaps", "CacheRouterKVEventLag",
            "CacheRouterIndexDegraded", "CacheRouterReplicaHotspot"} <= names
    for r in alert_rules():
        assert r["labels"]["severity"] in ("critical", "warning") and r["annotations"]["summary"]


# --- promtool ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    return exe


def test_promtool_check_rules(promtool: str) -> None:
    result = subprocess.run([promtool, "check", "rules", str(PROM / "alerts.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alerts(promtool: str) -> None:
    result = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROM,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_dashboard_expressions_parse(promtool: str, tmp_path: Path) -> None:
    # promtool parses PromQL in recording rules: one rule per dashboard query.
    rules = [{"record": f"dashboard:q{i}", "expr": grafana_to_promql(expr)}
             for i, (_, expr) in enumerate(dashboard_targets())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("config", ["deploy/prometheus/prometheus.yml", "deploy/k8s/prometheus/prometheus.yml"])
def test_promtool_check_config(promtool: str, tmp_path: Path, config: str) -> None:
    data = yaml.safe_load((ROOT / config).read_text())
    # The rule file is mounted at /etc/prometheus in the containers; point at the repo's copy.
    data["rule_files"] = [str(PROM / "alerts.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
