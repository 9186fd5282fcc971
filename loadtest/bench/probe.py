"""A liveness probe loop beside a load run: ``GET /health`` latency while the target is saturated.

It behaves like a kubelet probe (a new connection per probe, one at a time, a fixed
period), in a thread so that wrk and the probe never share an event loop. Bounded by a
stop event and by the count of probes it may send.
"""

from __future__ import annotations

import http.client
import statistics
import threading
import time
import urllib.request
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit


@dataclass
class ProbeStats:
    n: int
    failures: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def summarize(latencies_ms: list[float], failures: int) -> ProbeStats:
    if not latencies_ms:
        return ProbeStats(0, failures, float("nan"), float("nan"), float("nan"))
    xs = sorted(latencies_ms)
    p99 = xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]
    return ProbeStats(len(xs), failures, statistics.median(xs), p99, xs[-1])


class HealthProbe:
    """``with HealthProbe(url) as probe: <load>``; then ``probe.stats()``."""

    def __init__(self, url: str, *, period_s: float = 0.02, timeout_s: float = 2.0, max_probes: int = 10_000) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = parts.path or "/health"
        self.period_s, self.timeout_s, self.max_probes = period_s, timeout_s, max_probes
        self.latencies_ms: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="health-probe", daemon=True)

    def _once(self) -> None:
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            conn.request("GET", self.path)
            resp = conn.getresponse()
            resp.read()
            ok = resp.status == 200
        except OSError:
            ok = False
        finally:
            conn.close()
        if ok:
            self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        else:
            self.failures += 1

    def _loop(self) -> None:
        for _ in range(self.max_probes):
            if self._stop.wait(self.period_s):
                return
            self._once()

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s + 1)

    def stats(self) -> ProbeStats:
        return summarize(self.latencies_ms, self.failures)


def _families(base_url: str) -> Any:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
        return text_string_to_metric_families(r.read().decode())


def outcome_totals(base_url: str) -> dict[str, float]:
    """cache-router's ``cache_router_requests_total`` summed by outcome (ok, cancelled, timeout, ...)."""
    out: dict[str, float] = {}
    for family in _families(base_url):
        if family.name == "cache_router_requests":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    outcome = sample.labels.get("outcome", "")
                    out[outcome] = out.get(outcome, 0.0) + sample.value
    return out


def stage_totals(base_url: str) -> dict[str, tuple[float, float]]:
    """cache-router's ``cache_router_stage_seconds`` histograms: stage -> (sum seconds, count)."""
    out: dict[str, tuple[float, float]] = {}
    for family in _families(base_url):
        if family.name != "cache_router_stage_seconds":
            continue
        for sample in family.samples:
            stage = sample.labels.get("stage", "")
            total, count = out.get(stage, (0.0, 0.0))
            if sample.name.endswith("_sum"):
                out[stage] = (sample.value, count)
            elif sample.name.endswith("_count"):
                out[stage] = (total, sample.value)
    return out


def stage_means_us(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Mean µs per observation of each stage between two scrapes (stages observed in between)."""
    means: dict[str, float] = {}
    for stage, (total, count) in after.items():
        t0, c0 = before.get(stage, (0.0, 0.0))
        if count > c0:
            means[stage] = (total - t0) / (count - c0) * 1e6
    return means
