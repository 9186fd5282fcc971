"""The runner's HTTP client against a small real uvicorn server written here (not the sim).

The server is deliberately scripted (fixed delays, a chosen failure per prompt) so the
client's measurements can be checked against known values: TTFT after a known delay,
inter-token gaps, usage and router headers read, each error kind classified.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loadtest.runner.client import RequestRecord, new_session, send
from tests.support.servers import UvicornThread

FIRST_DELAY, GAP = 0.15, 0.03


async def completions(request: Request) -> Response:
    body = orjson.loads(await request.body())
    prompt = body.get("prompt") or body["messages"][-1]["content"]
    headers = {"x-cache-router-backend": "http://engine-1:8000/", "x-cache-router-matched-tokens": "32"}
    if prompt == "fail":
        return JSONResponse({"error": {"message": "boom", "type": "server_error", "code": 500}}, 500)
    usage = {"prompt_tokens": 40, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 32}}
    chat = "messages" in body

    def chunk(text: str) -> bytes:
        choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
        return b"data: " + orjson.dumps({"choices": [choice]}) + b"\n\n"

    if not body.get("stream"):
        choice = {"message": {"content": "a b c"}} if chat else {"text": "a b c"}
        return JSONResponse({"choices": [choice], "usage": usage}, headers=headers)

    async def events() -> AsyncIterator[bytes]:
        if prompt == "trickle":  # a token every 50 ms for up to 10 s: each read is quick, the whole is not
            for _ in range(200):
                yield chunk("x")
                await asyncio.sleep(0.05)
            return
        if chat:
            yield b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}) + b"\n\n"
        await asyncio.sleep(FIRST_DELAY)
        for i, word in enumerate(["a", " b", " c"]):
            if i:
                await asyncio.sleep(GAP)
            yield chunk(word)
            if prompt == "die" and i == 1:
                return  # the stream ends without [DONE]
        if prompt == "sse-error":
            yield b'data: {"error": {"message": "upstream died", "type": "server_error", "code": 502}}\n\n'
            return
        if body.get("stream_options", {}).get("include_usage"):
            yield b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


@pytest.fixture(scope="module")
def server() -> Iterator[UvicornThread]:
    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/chat/completions", completions, methods=["POST"])])
    srv = UvicornThread(app).start()
    yield srv
    srv.stop()


async def _send(url: str, path: str, body: dict[str, object], stream: bool = True,
                total: float | None = None) -> tuple[RequestRecord, str]:
    record = RequestRecord(0, 0, 0, 0.0, url)
    async with new_session(timeout_s=5.0) as session:
        reply = await send(session, record, path, body, stream, total)
    return record, reply


@pytest.mark.parametrize("path,body", [("/v1/completions", {"model": "m", "prompt": "hi"}),
                                       ("/v1/chat/completions", {"model": "m", "messages": [
                                           {"role": "user", "content": "hi"}]})])
async def test_stream_measures_ttft_itl_usage_and_headers(server: UvicornThread, path: str,
                                                          body: dict[str, object]) -> None:
    record, reply = await _send(server.url, path, body)
    assert record.ok and record.error is None and reply == "a b c"
    assert record.ttft_s is not None and FIRST_DELAY <= record.ttft_s < FIRST_DELAY + 0.2
    assert len(record.itl_s) == 2 and all(GAP * 0.8 <= x < GAP + 0.1 for x in record.itl_s)
    assert record.e2e_s is not None and record.e2e_s >= record.ttft_s + sum(record.itl_s) - 1e-3
    assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == (40, 32, 3)
    assert record.backend == "http://engine-1:8000" and record.matched_tokens == 32


async def test_non_streaming_reads_usage_without_ttft(server: UvicornThread) -> None:
    record, reply = await _send(server.url, "/v1/completions", {"model": "m", "prompt": "hi"}, stream=False)
    assert record.ok and reply == "a b c" and record.ttft_s is None and record.cached_tokens == 32


@pytest.mark.parametrize("prompt,kind", [("fail", "http_500"), ("die", "incomplete"), ("sse-error", "stream_error")])
async def test_errors_are_classified(server: UvicornThread, prompt: str, kind: str) -> None:
    record, reply = await _send(server.url, "/v1/completions", {"model": "m", "prompt": prompt})
    assert not record.ok and record.error == kind and reply == ""


async def test_connection_refused_is_connect_error() -> None:
    from tests.support.servers import free_port

    record, _ = await _send(f"http://127.0.0.1:{free_port()}", "/v1/completions", {"model": "m", "prompt": "x"})
    assert record.error == "connect"


async def test_a_trickling_stream_ends_at_the_total_timeout(server: UvicornThread) -> None:
    record, reply = await _send(server.url, "/v1/completions", {"model": "m", "prompt": "trickle"}, total=0.5)
    assert record.error == "timeout" and not record.ok and reply == ""
    assert record.e2e_s is not None and 0.5 <= record.e2e_s < 2.0
    assert record.ttft_s is not None and len(record.itl_s) >= 3  # tokens did arrive before the deadline
