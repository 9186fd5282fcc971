"""The OpenAI-compatible endpoints: completions, chat completions, models.

Plain Starlette routes with orjson: the hot path pays for no schema validation beyond
``router.request.parse``, which checks exactly what the router reads.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Mapping

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from router.api.body import read_body
from router.api.stream import ProxyResponse
from router.metrics import STAGE_SECONDS
from router.pipeline import Pipeline, Routed
from router.request.model import Kind
from router.request.parse import parse_request
from router.tenancy import Tenant

_parse_stage = STAGE_SECONDS.labels("parse")
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


_ids = itertools.count(1)
_ID_PREFIX = os.urandom(4).hex()  # per process: ids stay unique across router replicas


def request_id(headers: Mapping[str, str]) -> str:
    given = headers.get("x-request-id")
    if given is not None and _SAFE_ID.fullmatch(given):
        return given
    return f"{_ID_PREFIX}-{next(_ids):x}"


async def route_body(pipeline: Pipeline, kind: Kind, headers: Mapping[str, str], tenant: Tenant,
                     raw: bytes) -> Routed:
    """A hot request's body (read by either server path) -> its routing decision."""
    t0 = time.perf_counter()
    req = parse_request(raw, kind)
    req.set_salt(pipeline.tenancy.salt_for(tenant, req.cache_salt))
    _parse_stage.observe(time.perf_counter() - t0)
    header = pipeline.config.scheduling.session_header
    session = headers.get(header) if header else None
    return await pipeline.route(req, request_id(headers), session)


async def _route(request: Request, kind: Kind) -> ASGIApp:
    """The ASGI path (``router.api.hot`` is uvicorn's lean one for the same two routes)."""
    pipeline: Pipeline = request.app.state.pipeline
    headers = request.headers
    tenant = pipeline.tenancy.identify(headers)  # before reading a body nobody may send
    raw = await read_body(request, pipeline.config.max_body_bytes)
    return ProxyResponse(pipeline, await route_body(pipeline, kind, headers, tenant, raw))


async def completions(request: Request) -> ASGIApp:
    return await _route(request, "completion")


async def chat_completions(request: Request) -> ASGIApp:
    return await _route(request, "chat")


async def models(request: Request) -> Response:
    pipeline: Pipeline = request.app.state.pipeline
    pipeline.tenancy.identify(request.headers)
    names = sorted(pipeline.fleet.models())
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "cache-router"} for m in names]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")
