"""The HTTP face of one simulated engine: vLLM's OpenAI-compatible API plus test controls.

vLLM endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE streaming with
``data: [DONE]``, or one JSON body; ``stream_options.include_usage``;
``usage.prompt_tokens_details.cached_tokens``; ``cache_salt``), ``GET /v1/models``,
``GET /health``, ``GET /metrics``, ``POST /reset_prefix_cache``.
Simulator controls (not in vLLM): ``GET /sim/cache`` (the exact cache contents),
``GET /sim/stats``, ``GET|POST /sim/faults``, ``POST /sim/restart``.

Bad input gets OpenAI's error shape with a 4xx, never a 500. Prompt text is never logged.
It owns request parsing and response shapes; the engine owns what happens inside.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from loadtest.engine.cache import as_int
from loadtest.engine.engine import Engine
from loadtest.engine.metrics import CONTENT_TYPE, exposition, make_registry
from loadtest.engine.request import ApiError, RequestParser, load_json
from router.hashing.tokenizer import ModelTokenizer


class StreamCut(Exception):
    """Injected fault: the stream dies mid-way (uvicorn drops the connection)."""


class _CutQuietly:
    """A stream cut on purpose (fault, restart) closes the connection without a traceback in the log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except (StreamCut, ConnectionAbortedError):
            pass  # uvicorn sees an unfinished response and drops the connection, as a dying engine would


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


def error_response(err: ApiError) -> Response:
    return Response(err.body(), err.status, media_type="application/json")


class EngineApp:
    """Routes for one engine; ``.app`` is the ASGI application."""

    def __init__(self, engine: Engine, tokenizer: ModelTokenizer) -> None:
        self.engine = engine
        self.parser = RequestParser(engine, tokenizer)
        self.registry = make_registry(engine)
        self.app = _CutQuietly(
            Starlette(
                routes=[
                    Route("/v1/completions", self.completions, methods=["POST"]),
                    Route("/v1/chat/completions", self.chat, methods=["POST"]),
                    Route("/v1/models", self.models, methods=["GET"]),
                    Route("/health", self.health, methods=["GET"]),
                    Route("/metrics", self.metrics, methods=["GET"]),
                    Route("/reset_prefix_cache", self.reset_prefix_cache, methods=["POST"]),
                    Route("/sim/cache", self.sim_cache, methods=["GET"]),
                    Route("/sim/stats", self.sim_stats, methods=["GET"]),
                    Route("/sim/faults", self.sim_faults, methods=["GET", "POST"]),
                    Route("/sim/restart", self.sim_restart, methods=["POST"]),
                ]
            )
        )

    # --- vLLM API ----------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def models(self, request: Request) -> Response:
        e = self.engine
        created = int(e.start_time)
        card = {
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "max_model_len": e.config.max_model_len,
        }
        data = [{"id": e.model, "root": e.model, "parent": None, **card}]
        data += [{"id": name, "root": name, "parent": e.model, **card} for name in e.config.loras]
        return json_response({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        faults = self.engine.faults
        if faults.health_delay_s > 0:
            await asyncio.sleep(faults.health_delay_s)
        if faults.health_fail or faults.down:
            return Response(status_code=503)
        return Response(status_code=200)

    async def metrics(self, request: Request) -> Response:
        return Response(exposition(self.registry), media_type=CONTENT_TYPE)

    async def reset_prefix_cache(self, request: Request) -> Response:
        ok = self.engine.reset_prefix_cache()
        return json_response({"reset": ok}, 200)

    # --- simulator controls --------------------------------------------------------------
    async def sim_cache(self, request: Request) -> Response:
        blocks = [
            {
                "hash": as_int(b.digest),
                "digest": b.digest.hex(),
                "parent": None if b.parent is None else as_int(b.parent),
                "token_ids": list(b.token_ids),
                "lora_name": b.lora_name,
                "ref_cnt": b.ref_cnt,
            }
            for b in self.engine.cache.contents().values()
        ]
        return json_response(
            {
                "block_size": self.engine.cache.block_size,
                "num_blocks": self.engine.cache.num_blocks,
                "blocks": blocks,
            }
        )

    async def sim_stats(self, request: Request) -> Response:
        e = self.engine
        s = e.stats
        return json_response(
            {
                "requests": s.requests,
                "requests_ok": s.requests_ok,
                "requests_failed": s.requests_failed,
                "prompt_tokens": s.prompt_tokens,
                "cached_tokens": s.cached_tokens,
                "generation_tokens": s.generation_tokens,
                "busy_seconds": e.scheduler.busy_seconds,
                "prefill_seconds": e.scheduler.prefill_seconds,
                "running": e.scheduler.num_running,
                "waiting": e.scheduler.num_waiting,
                "cached_blocks": len(e.cache),
                "kv_cache_usage": e.cache.usage,
                "start_time": e.start_time,
                "event_seq": e.publisher.seq if e.publisher else None,
            }
        )

    async def sim_faults(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                self.engine.faults.update(load_json(await request.body()))
            except ApiError as err:
                return error_response(err)
            except ValueError as exc:
                return error_response(ApiError(400, str(exc)))
        return json_response(self.engine.faults.to_dict())

    async def sim_restart(self, request: Request) -> Response:
        downtime = request.query_params.get("downtime_s", "0")
        try:
            seconds = float(downtime)
        except ValueError:
            return error_response(ApiError(400, "downtime_s must be a number"))
        self.engine.restart()
        self.engine.faults.down_until = time.monotonic() + max(0.0, seconds)
        return json_response({"restarted": True, "start_time": self.engine.start_time})

    # --- generation --------------------------------------------------------------------
    async def _generate(self, request: Request, *, chat: bool) -> Response:
        engine = self.engine
        try:
            if engine.faults.down:
                raise ApiError(503, "engine is restarting", "ServiceUnavailableError")
            req = await self.parser.parse(load_json(await request.body()), chat=chat)
        except ApiError as err:
            return error_response(err)
        if engine.faults.should_fail(engine.rng):
            engine.stats.requests_failed += 1
            return error_response(
                ApiError(engine.faults.error_status, "simulated engine failure", "InternalServerError")
            )
        await engine.faults.wait_while_hung()  # the client's timeout or disconnect ends it
        run = engine.start(req.prompt, req.max_tokens, lora_name=req.lora_name, salt=req.salt, seed=req.seed)
        meta = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "created": int(time.time()),
            "model": req.model,
        }
        if req.stream:
            return StreamingResponse(
                self._stream(run, meta, chat, req.include_usage), media_type="text/event-stream"
            )
        ok = False
        try:
            await run.prefill()
            while not run.done:
                await run.next_token()
            ok = True
        except ConnectionAbortedError:  # EngineRestarted, or cut while waiting for a slot
            return error_response(ApiError(503, "engine restarted", "ServiceUnavailableError"))
        finally:
            run.close(ok)
        text = "".join(engine.vocab.text[t] for t in run.generated)
        choice: dict[str, Any] = {
            "index": 0,
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        }
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return json_response(
            {
                **meta,
                "object": "chat.completion" if chat else "text_completion",
                "choices": [choice],
                "usage": _usage(run.prompt_tokens, len(run.generated), run.cached_tokens),
            }
        )

    async def _stream(
        self, run: Any, meta: dict[str, Any], chat: bool, include_usage: bool
    ) -> AsyncIterator[bytes]:
        engine = self.engine
        die_after = engine.faults.die_after_tokens
        stall_after = engine.faults.stall_after_tokens
        obj = "chat.completion.chunk" if chat else "text_completion"
        extra: dict[str, Any] = {"usage": None} if include_usage else {}
        ok = False
        try:
            await run.prefill()
            if chat:
                first = {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                yield _sse({**meta, "object": obj, "choices": [first], **extra})
            sent = 0
            while True:
                token = run.generated[-1]
                if die_after is not None and sent >= die_after:
                    raise StreamCut("simulated engine death mid-stream")
                if stall_after is not None and sent >= stall_after:
                    await asyncio.Event().wait()  # silent until the client gives up and disconnects
                finish = "length" if run.done else None
                piece = engine.vocab.text[token]
                choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
                if chat:
                    choice["delta"] = {"content": piece}
                else:
                    choice["text"] = piece
                    choice["stop_reason"] = None
                yield _sse({**meta, "object": obj, "choices": [choice], **extra})
                sent += 1
                if run.done:
                    break
                await run.next_token()
            if include_usage:
                yield _sse(
                    {
                        **meta,
                        "object": obj,
                        "choices": [],
                        "usage": _usage(run.prompt_tokens, len(run.generated), run.cached_tokens),
                    }
                )
            yield b"data: [DONE]\n\n"
            ok = True
        finally:
            run.close(ok)


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"
