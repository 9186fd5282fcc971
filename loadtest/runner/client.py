"""One measured request: send, stream, time every token, and classify what went wrong.

TTFT is the time to the first chunk that carries text (not the first byte: role-only
chunks and keep-alives do not count). Inter-token latency is every gap between text
chunks. Usage (prompt, cached and completion tokens) comes from the non-streaming body
or the streaming usage chunk, which the client always asks for.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

BACKEND_HEADER = "x-cache-router-backend"
MATCHED_HEADER = "x-cache-router-matched-tokens"


@dataclass
class RequestRecord:
    """What the client measured for one request. Holds no prompt text."""

    index: int
    conversation: int
    turn: int
    start_s: float                     # since the run started
    url: str                           # where it was sent (a router, or an engine under direct round robin)
    ok: bool = False
    error: str | None = None           # http_<status>, timeout, connect, disconnected, transport, stream_error,
                                       # incomplete, bad_body
    status: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    backend: str | None = None         # x-cache-router-backend
    matched_tokens: int | None = None  # x-cache-router-matched-tokens (the router's prediction)
    late_s: float | None = None        # open loop: sent this long after its scheduled arrival
    round: int = 0                     # which round of its arm (several rounds merged: loadtest.runner.rounds)


def _text_of(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return str((choice.get("delta") or {}).get("content") or "")
    if "message" in choice:
        return str((choice.get("message") or {}).get("content") or "")
    return str(choice.get("text") or "")


def _take_usage(record: RequestRecord, usage: dict[str, Any] | None) -> None:
    if not usage:
        return
    record.prompt_tokens = usage.get("prompt_tokens")
    record.completion_tokens = usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    record.cached_tokens = int(cached) if cached is not None else None


def _take_headers(record: RequestRecord, headers: httpx.Headers) -> None:
    backend = headers.get(BACKEND_HEADER)
    record.backend = backend.rstrip("/") if backend else None
    matched = headers.get(MATCHED_HEADER)
    if matched is not None and matched.strip().lstrip("-").isdigit():
        record.matched_tokens = int(matched)


async def send(client: httpx.AsyncClient, record: RequestRecord, path: str, body: dict[str, Any],
               stream: bool, total_timeout_s: float | None = None) -> str:
    """Send one request, filling ``record``; returns the reply text ("" on error).

    ``total_timeout_s`` bounds the whole request, so a stream that trickles forever ends too
    (the client's own timeouts only bound each read).
    """
    payload = dict(body, stream=stream)
    if stream:
        payload["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    parts: list[str] = []
    try:
        async with asyncio.timeout(total_timeout_s):
            await _exchange(client, record, path, payload, stream, t0, parts)
    except (httpx.TimeoutException, TimeoutError):
        record.ok, record.error = False, "timeout"
    except httpx.ConnectError:
        record.error = "connect"
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
        record.error = "disconnected"
    except httpx.HTTPError:
        record.error = "transport"
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        record.error = "bad_body"
    record.e2e_s = time.perf_counter() - t0
    return "".join(parts) if record.ok else ""


async def _exchange(client: httpx.AsyncClient, record: RequestRecord, path: str, payload: dict[str, Any],
                    stream: bool, t0: float, parts: list[str]) -> None:
    if stream:
        await _stream(client, record, record.url.rstrip("/") + path, payload, t0, parts)
    else:
        resp = await client.post(record.url.rstrip("/") + path, content=orjson.dumps(payload),
                                 headers={"content-type": "application/json"})
        record.status = resp.status_code
        _take_headers(record, resp.headers)
        if resp.status_code >= 400:
            record.error = f"http_{resp.status_code}"
        else:
            data = orjson.loads(resp.content)
            parts.append(_text_of(data))
            _take_usage(record, data.get("usage"))
            record.ok = True


async def _stream(client: httpx.AsyncClient, record: RequestRecord, url: str, payload: dict[str, Any],
                  t0: float, parts: list[str]) -> None:
    last: float | None = None
    done = False
    async with client.stream("POST", url, content=orjson.dumps(payload),
                             headers={"content-type": "application/json"}) as resp:
        record.status = resp.status_code
        _take_headers(record, resp.headers)
        if resp.status_code >= 400:
            await resp.aread()
            record.error = f"http_{resp.status_code}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = orjson.loads(data)
            if "error" in chunk:
                record.error = "stream_error"
                return
            text = _text_of(chunk)
            if text:
                now = time.perf_counter()
                if last is None:
                    record.ttft_s = now - t0
                else:
                    record.itl_s.append(now - last)
                last = now
                parts.append(text)
            if chunk.get("usage"):
                _take_usage(record, chunk["usage"])
    if done:
        record.ok = True
    else:
        record.error = "incomplete"
