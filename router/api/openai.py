"""The OpenAI-compatible endpoints: completions, chat completions, models.

Plain Starlette routes with orjson: the hot path pays for no schema validation beyond
``router.request.parse``, which checks exactly what the router reads.
"""

from __future__ import annotations

import itertools
import os
import re
import time

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from router.api.body import read_body
from router.api.stream import ProxyResponse
from router.metrics import STAGE_SECONDS
from router.pipeline import Pipeline
from router.request.model import Kind
from router.request.parse import parse_request

_parse_stage = STAGE_SECONDS.labels("parse")
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


_ids = itertools.count(1)
_ID_PREFIX = os.urandom(4).hex()  # per process: ids stay unique across router replicas


def request_id(request: Request) -> str:
    given = request.headers.get("x-request-id")
    if given is not None and _SAFE_ID.fullmatch(given):
        return given
    return f"{_ID_PREFIX}-{next(_ids):x}"


async def _route(request: Request, kind: Kind) -> ASGIApp:
    pipeline: Pipeline = request.app.state.pipeline
    tenant = pipeline.tenancy.identify(request.headers)  # before reading a body nobody may send
    raw = await read_body(request, pipeline.config.max_body_bytes)
    t0 = time.perf_counter()
    req = parse_request(raw, kind)
    req.set_salt(pipeline.tenancy.salt_for(tenant, req.cache_salt))
    _parse_stage.observe(time.perf_counter() - t0)
    header = pipeline.config.scheduling.session_header
    session = request.headers.get(header) if header else None
    routed = await pipeline.route(req, request_id(request), session)
    return ProxyResponse(pipeline, routed)


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
