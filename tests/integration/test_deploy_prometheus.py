"""The dashboard and the alert rules against a real Prometheus scraping a real router under load.

A real ``prometheus`` (Debian's package) scrapes cache-router every second while
``python -m loadtest run`` drives a short shared-prefix load through it to three simulated vLLM
engines (two in precise mode with KV events, one approximate, small caches so blocks are
evicted), with the Redis index and 30% of traffic on the experiment's baseline arm. Then every
expression of the dashboard is queried through Prometheus' HTTP API and must return data, and
every alert rule must evaluate without error.

A query may come back empty only when a metric it reads has no series at all because its event
never happened in this run (no Redis error, no gap...); those metrics must be in EVENT_DRIVEN,
and the test prints which ones were absent.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from loadtest.engine import SimFleet
from tests.conftest import ROOT, SIM_MODEL
from tests.support.router import router_config, running_router
from tests.support.servers import RedisServer, env_without_proxies, free_port
from tests.unit.test_deploy_observability import METRIC_REF, alert_rules, dashboard_targets, grafana_to_promql

PROM_DIR = ROOT / "deploy" / "prometheus"
# Counters and histograms that only get a series when their event happens.
EVENT_DRIVEN = {
    "cache_router_retries_total", "cache_router_stream_errors_total", "cache_router_stale_hits_total",
    "cache_router_engine_restarts_total", "cache_router_index_errors_total", "cache_router_rejected_total",
    "cache_router_kv_event_decode_errors_total", "cache_router_kv_event_gaps_total", "cache_router_kv_replays_total",
    "cache_router_block_size_mismatch_total", "cache_router_block_retention_seconds_bucket",
}


class Prometheus:
    """A real Prometheus on a free loopback port with a temp TSDB."""

    def __init__(self, router_port: int) -> None:
        exe = shutil.which("prometheus")
        if exe is None:
            pytest.skip("prometheus is not installed (Debian package prometheus; .ci/run installs it)")
        self.dir = Path(tempfile.mkdtemp(prefix="cr-prom-"))
        self.port = free_port()
        config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(PROM_DIR / "alerts.yml")]
        config["scrape_configs"] = [{"job_name": "cache-router",
                                     "static_configs": [{"targets": [f"127.0.0.1:{router_port}"]}]}]
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(self.dir / "prometheus.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [exe, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env_without_proxies())
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", trust_env=False, timeout=10)

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/-/ready").status_code == 200:
                    return
            assert self.proc.poll() is None, (self.dir / "prometheus.log").read_text()
            time.sleep(0.1)
        raise TimeoutError("prometheus did not become ready")

    def wait_scraping(self, timeout: float = 30) -> None:
        """Until the router's target has been scraped once: Prometheus 2 hands new targets to the
        scrapers only after its discovery throttle (~5 s), and a quick load could end before that."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            targets = self.http.get("/api/v1/targets").json()["data"]["activeTargets"]
            if any(t.get("health") == "up" for t in targets):
                return
            time.sleep(0.2)
        raise TimeoutError("prometheus never scraped the router")

    def query(self, expr: str, at: float) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get("/api/v1/query", params={"query": expr, "time": f"{at:.3f}"}).json()
        return body

    def stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Run:
    prom: Prometheus
    at: float
    """Query time: just after the load ended."""
    window: str
    """A rate window covering the whole load, however long this machine took to run it."""
    urls: list[str]


@pytest.fixture(scope="module")
def scraped_run() -> Iterator[Run]:
    """Router + engines + Prometheus, a short load through them."""
    redis = RedisServer().start()
    with contextlib.ExitStack() as stack:
        stack.callback(redis.stop)
        fleet = stack.enter_context(SimFleet(3, block_size=16, cache_blocks=96, kv_events="bind"))
        backends: list[dict[str, Any]] = [
            {"url": s.url, "kv_events": s.kv_events, "kv_replay": s.kv_replay} for s in (fleet[0], fleet[1])]
        backends.append({"url": fleet[2].url})  # approximate mode: the index learns from routing only
        config = router_config(
            backends, tokenizer=str(SIM_MODEL), block_size=16, redis_url=redis.url,
            index={"namespace": f"prom{free_port()}"}, scheduling={"metrics_interval_s": 0.2},
            experiment={"baseline_fraction": 0.3, "baseline_policy": "round_robin"},
            # Lenient probes: a busy CI machine must not flap replicas out of this run.
            health={"interval_s": 0.5, "timeout_s": 2.0, "failure_threshold": 3})
        with running_router(config) as router:
            prom = Prometheus(router.port)
            try:
                prom.wait_ready()
                prom.wait_scraping()
                out = Path(prom.dir) / "run.json"
                started = time.time()
                load = subprocess.run(
                    [sys.executable, "-m", "loadtest", "run", "--target", router.url, "--workload", "shared_prefix",
                     "--seed", "7", "--concurrency", "8", "--requests", "300", "--duration", "8",
                     "--no-progress", "--out", str(out)],
                    capture_output=True, text=True, timeout=60, cwd=ROOT, env=env_without_proxies())
                assert load.returncode == 0, load.stdout[-2000:] + load.stderr[-2000:]
                at = time.time()
                time.sleep(2.5)  # the last scrapes and a rule evaluation land
                yield Run(prom, at, f"{int(at - started) + 5}s", fleet.urls)
            finally:
                prom.stop()


def series_exist(prom: Prometheus, name: str, at: float) -> bool:
    result = prom.query(f"count({{__name__={name!r}}})".replace("'", '"'), at)
    return result["status"] == "success" and bool(result["data"]["result"])


def test_every_dashboard_query_returns_data(scraped_run: Run) -> None:
    prom, at = scraped_run.prom, scraped_run.at
    empty: list[str] = []
    absent: set[str] = set()
    checked = 0
    for title, expr in dashboard_targets():
        promql = grafana_to_promql(expr, scraped_run.window)
        result = prom.query(promql, at)
        assert result["status"] == "success", f"{title}: {promql}: {result.get('error')}"
        if result["data"]["result"]:
            checked += 1
            continue
        missing = {name for name, _ in METRIC_REF.findall(promql) if not series_exist(prom, name, at)}
        if missing and missing <= EVENT_DRIVEN:
            absent |= missing
            continue
        empty.append(f"{title}: {promql} (metrics without series: {sorted(missing)})")
    print(f"\n{checked} dashboard queries returned data; event metrics with no event in this run: {sorted(absent)}")
    assert empty == [], "dashboard queries with no data:\n" + "\n".join(empty)
    assert checked >= 0.75 * len(dashboard_targets()), "most panels must show data from a plain load"


def test_core_panels_show_the_load(scraped_run: Run) -> None:
    """Not just any data: the load shows up where an operator looks first. (Series of other tests'
    replicas may share this process's registry: look at this run's replicas.)"""
    prom, at, urls, w = scraped_run.prom, scraped_run.at, scraped_run.urls, scraped_run.window

    def values(expr: str) -> dict[str, float]:
        result = prom.query(expr, at)["data"]["result"]
        return {",".join(f"{k}={v}" for k, v in sorted(r["metric"].items())): float(r["value"][1]) for r in result}

    per_backend = values("sum by (backend) (cache_router_requests_total)")
    assert all(per_backend.get(f"backend={u}", 0) > 0 for u in urls), per_backend
    total = values(f"sum(rate(cache_router_requests_total[{w}]))")
    assert next(iter(total.values())) > 0, total
    arms = values(f"sum by (arm) (rate(cache_router_prompt_tokens_total[{w}]))")
    assert arms.get("arm=baseline", 0) > 0 and arms.get("arm=main", 0) > 0, arms
    hit = values(f"sum(rate(cache_router_engine_cached_tokens_total[{w}])) "
                 f"/ sum(rate(cache_router_prompt_tokens_total[{w}]))")
    assert 0 < next(iter(hit.values())) <= 1, hit
    events = values(f"sum by (type) (rate(cache_router_kv_events_total[{w}]))")
    assert "type=BlockStored" in events, events


def test_every_alert_rule_evaluates_without_error(scraped_run: Run) -> None:
    prom, at = scraped_run.prom, scraped_run.at
    for rule in alert_rules():
        result = prom.query(rule["expr"], at)
        assert result["status"] == "success", f"{rule['alert']}: {result.get('error')}"
    groups = prom.http.get("/api/v1/rules").json()["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in alert_rules()}
    for name, rule in loaded.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
    # The router is up and scraped: the router-down alert must not fire.
    assert not any(r["state"] == "firing" for n, r in loaded.items() if n == "CacheRouterDown")
    up = prom.query('up{job="cache-router"}', at)["data"]["result"]
    assert [float(r["value"][1]) for r in up] == [1.0]
