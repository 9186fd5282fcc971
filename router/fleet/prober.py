"""Active health probes: one cheap ``GET /health`` per replica, judged with thresholds.

``HealthTracker`` is the pure verdict (``failure_threshold`` consecutive failures make a
healthy replica unhealthy, ``success_threshold`` consecutive successes the reverse; a
replica starts unhealthy until its first passing probe). ``probe`` is the one request.
The loop that runs them for every replica lives in ``router.fleet.registry``.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx


@dataclass
class HealthTracker:
    failure_threshold: int
    success_threshold: int
    healthy: bool = False
    _successes: int = 0
    _failures: int = 0

    def observe(self, ok: bool) -> bool:
        """Record one probe result; True when the verdict changed."""
        if ok:
            self._successes += 1
            self._failures = 0
            if not self.healthy and self._successes >= self.success_threshold:
                self.healthy = True
                return True
        else:
            self._failures += 1
            self._successes = 0
            if self.healthy and self._failures >= self.failure_threshold:
                self.healthy = False
                return True
        return False


async def probe(client: httpx.AsyncClient, base_url: str, timeout_s: float) -> bool:
    """True if the replica answers ``/health`` with a 2xx within the timeout.

    The body is not read beyond what httpx buffers: vLLM answers an empty 200.
    """
    try:
        response = await client.get(f"{base_url}/health", timeout=timeout_s)
    except (httpx.HTTPError, OSError):
        return False
    return response.is_success
