"""Operational endpoints: liveness, readiness, metrics, and the ``/debug/route`` dry run."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from router.api.body import read_body
from router.api.schema import OPENAPI
from router.errors import NoHealthyBackend
from router.metrics import REGISTRY
from router.pipeline import Pipeline
from router.request.parse import guess_kind, parse_json, parse_request

_OK = orjson.dumps({"status": "ok"})
_OPENAPI = orjson.dumps(OPENAPI)


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


async def health(request: Request) -> Response:
    """Liveness: the event loop answers. Cheap on purpose (probes hit it under load)."""
    return Response(_OK, media_type="application/json")


async def ready(request: Request) -> Response:
    pipeline: Pipeline = request.app.state.pipeline
    if pipeline.fleet.ready():
        return _json({"status": "ready"})
    return Response(orjson.dumps({"status": "not ready", "reason": "no healthy replica"}), status_code=503,
                    headers={"retry-after": "1"}, media_type="application/json")


async def openapi(request: Request) -> Response:
    return Response(_OPENAPI, media_type="application/json")


async def metrics(request: Request) -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def debug_route(request: Request) -> Response:
    """Dry run: what the router would do with this request, without sending it.

    Like every admin endpoint: off (404) unless an admin token is configured, then only with it.
    It reveals which replica holds which prefix, so it is never open by default."""
    pipeline: Pipeline = request.app.state.pipeline
    pipeline.tenancy.check_admin(request.headers)
    # A tenant sees its own prefixes only: the same server-side salt as its real requests.
    tenant = pipeline.tenancy.identify(request.headers)
    raw = await read_body(request, pipeline.config.max_body_bytes)
    req = parse_request(raw, guess_kind(parse_json(raw)))
    req.set_salt(pipeline.tenancy.salt_for(tenant, req.cache_salt))
    pipeline.check_model(req.model)
    header = pipeline.config.scheduling.session_header
    g = await pipeline.gather(req, request.headers.get(header) if header else None)
    g.route = dataclasses.replace(g.route, explain=True)  # every scorer's part, not only tie-breaks
    bs = g.enc.block_size
    pick: dict[str, Any] | None = None
    error: str | None = None
    scores: dict[str, dict[str, float]] = {}
    try:
        d = pipeline.decide(g)
        scores = {str(k): v for k, v in d.scores.items()}
        pick = {"backend": d.backend, "reason": d.reason, "matched_tokens": d.matched_tokens,
                "best_matched_tokens": d.best_matched_tokens, "ranked": list(d.ranked)}
    except NoHealthyBackend as exc:
        error = exc.message
    replicas = [
        {"backend": c.id, "matched_blocks": c.matched_blocks,
         "matched_tokens": min(c.matched_blocks, g.enc.cacheable_blocks) * bs,
         "in_flight": c.in_flight, "waiting": c.waiting, "running": c.running, "kv_usage": c.kv_usage,
         "healthy": c.healthy, "circuit_open": c.circuit_open, "draining": c.draining,
         "scores": scores.get(c.id)}
        for c in g.candidates
    ]
    return _json({
        "model": req.model, "prompt_tokens": g.enc.prompt_tokens, "block_size": bs,
        "blocks": len(g.enc.keys), "cacheable_tokens": g.enc.cacheable_blocks * bs,
        "approximate": g.enc.approximate, "index_available": g.index_available,
        "index": pipeline.index.name, "policy": pipeline.config.policy,
        "replicas": replicas, "pick": pick, "error": error,
    })
