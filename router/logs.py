"""The one decision log line per request (logger ``cache_router.decision``), as JSON.

It names the request, model, arm, token counts, the prediction, what the engine reported,
the chosen replica, the reason, attempts, status, outcome and latency: never prompt text,
never a tenant key. ``log_decisions: false`` (or a level above INFO) turns it off.
"""

from __future__ import annotations

import logging
import time

import orjson

from router.request.prompt import EncodedPrompt
from router.scheduling.model import Decision

log = logging.getLogger("cache_router.decision")


def log_decision(enabled: bool, rid: str, model: str, enc: EncodedPrompt, index_available: bool,
                 d: Decision | None, arm: str, outcome: str, status: int, started: float, *,
                 backend: str | None = None, cached: int | None = None, attempts: int = 0) -> None:
    if not enabled or not log.isEnabledFor(logging.INFO):
        return
    line = {"id": rid, "model": model, "arm": arm, "prompt_tokens": enc.prompt_tokens,
            "approximate": enc.approximate, "index": index_available,
            "matched": d.matched_tokens if d else 0, "best": d.best_matched_tokens if d else 0,
            "cached": cached, "backend": backend, "reason": d.reason if d else "none",
            "attempts": attempts, "status": status, "outcome": outcome,
            "latency_ms": round((time.monotonic() - started) * 1e3, 3)}
    log.info(orjson.dumps(line).decode())
