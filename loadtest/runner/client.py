"""One measured request: send, stream, time every token, and classify what went wrong.

TTFT is the time to the first chunk that carries text (not the first byte: role-only
chunks and keep-alives do not count). Inter-token latency is every gap between text
chunks. Usage (prompt, cached and completion tokens) comes from the non-streaming body
or the streaming usage chunk, which the client always asks for.

Why aiohttp and not httpx: the generator is the measuring instrument and shares the
machine with what it measures. A streamed 34-chunk request cost it 2.8-2.9 ms of CPU
through httpx (pure-Python h11 parsing and line decoding) against 0.63-0.75 ms through
aiohttp's C parser (one sim engine in zero-delay mode, 480 requests at 16 in flight, the
client's process time per request, 2026-11-29). At the demo's ~100 requests/s that was a third of a core,
taken from the router and engines under test and added to every latency it recorded.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDictProxy

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


def _take_headers(record: RequestRecord, headers: CIMultiDictProxy[str]) -> None:
    backend = headers.get(BACKEND_HEADER)
    record.backend = backend.rstrip("/") if backend else None
    matched = headers.get(MATCHED_HEADER)
    if matched is not None and matched.strip().lstrip("-").isdigit():
        record.matched_tokens = int(matched)


def new_session(timeout_s: float = 120.0, connect_s: float = 10.0) -> aiohttp.ClientSession:
    """The session ``send`` expects: no connection limit (the run bounds concurrency), no env proxies."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0),
        timeout=aiohttp.ClientTimeout(total=None, connect=connect_s, sock_read=timeout_s),
        trust_env=False, auto_decompress=False)


async def send(session: aiohttp.ClientSession, record: RequestRecord, path: str, body: dict[str, Any],
               stream: bool, total_timeout_s: float | None = None) -> str:
    """Send one request, filling ``record``; returns the reply text ("" on error).

    ``total_timeout_s`` bounds the whole request, so a stream that trickles forever ends too
    (the session's own timeouts only bound each read).
    """
    payload = dict(body, stream=stream)
    if stream:
        payload["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    parts: list[str] = []
    try:
        async with asyncio.timeout(total_timeout_s):
            await _exchange(session, record, path, payload, stream, t0, parts)
    except TimeoutError:  # asyncio's and aiohttp's read/connect timeouts alike
        record.ok, record.error = False, "timeout"
    except aiohttp.ClientConnectorError:
        record.error = "connect"
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError):
        record.error = "disconnected"
    except aiohttp.ClientError:
        record.error = "transport"
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        record.error = "bad_body"
    record.e2e_s = time.perf_counter() - t0
    return "".join(parts) if record.ok else ""


_JSON = {"content-type": "application/json"}


async def _exchange(session: aiohttp.ClientSession, record: RequestRecord, path: str, payload: dict[str, Any],
                    stream: bool, t0: float, parts: list[str]) -> None:
    url = record.url.rstrip("/") + path
    async with session.post(url, data=orjson.dumps(payload), headers=_JSON) as resp:
        record.status = resp.status
        _take_headers(record, resp.headers)
        if resp.status >= 400:
            await resp.read()
            record.error = f"http_{resp.status}"
            return
        if stream:
            await _stream(resp, record, t0, parts)
            return
        data = orjson.loads(await resp.read())
        parts.append(_text_of(data))
        _take_usage(record, data.get("usage"))
        record.ok = True


async def _stream(resp: aiohttp.ClientResponse, record: RequestRecord, t0: float, parts: list[str]) -> None:
    last: float | None = None
    done = False
    async for line in resp.content:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
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
