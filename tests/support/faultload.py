"""Bounded load for fault tests: requests sent, failed and hung, streams cut with an SSE error.

``run_load(urls, n, concurrency, ...)`` sends ``n`` completions (a share of them streaming)
round-robin over router URLs, at most ``concurrency`` at a time, each within ``hang_s``, and
returns a ``Tally``. A streaming answer counts as *ok* when it ends with ``[DONE]`` and no
error event, as *stream_error* when the router ended it with its SSE error event (the
replica died after the first byte: the documented outcome), and as *failed* otherwise
(cut without an event, a non-200, a transport error). Nothing is retried by the client.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

PREFIXES = [f"Tenant {g} system prompt: you answer questions about shipment batch {g}. " * 6
            for g in range(16)]


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    hung: int = 0
    stream_errors: int = 0
    streams: int = 0
    latencies: list[float] = field(default_factory=list)
    backends: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    cached: int = 0
    prompt: int = 0

    def line(self, what: str) -> str:
        lat = sorted(self.latencies)
        p50 = lat[len(lat) // 2] * 1000 if lat else 0.0
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else 0.0
        return (f"{what}: sent {self.sent}, ok {self.ok}, failed {self.failed}, hung {self.hung}, "
                f"streams {self.streams} (ended by SSE error event {self.stream_errors}), "
                f"p50 {p50:.0f} ms, p99 {p99:.0f} ms, failures {dict(self.failures)}")


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any], hang_s: float, t: Tally) -> None:
    t.sent += 1
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(hang_s):
            if body.get("stream"):
                t.streams += 1
                await _stream(client, url, body, t)
            else:
                r = await client.post(url + "/v1/completions", json=body)
                if r.status_code != 200:
                    t.failed += 1
                    t.failures[f"status {r.status_code}"] += 1
                    return
                t.ok += 1
                t.backends[r.headers.get("x-cache-router-backend", "")] += 1
                usage = r.json().get("usage") or {}
                t.prompt += usage.get("prompt_tokens") or 0
                t.cached += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        t.latencies.append(time.monotonic() - t0)
    except TimeoutError:
        t.hung += 1
    except httpx.HTTPError as exc:
        t.failed += 1
        t.failures[type(exc).__name__] += 1


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], t: Tally) -> None:
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            t.failed += 1
            t.failures[f"status {r.status_code}"] += 1
            return
        t.backends[r.headers.get("x-cache-router-backend", "")] += 1
        done = errored = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
            elif data.startswith('{"error"'):
                errored = "error" in orjson.loads(data)
    if errored and done:
        t.stream_errors += 1
    elif done:
        t.ok += 1
    else:
        t.failed += 1
        t.failures["stream cut without an error event"] += 1


async def run_load(urls: list[str], n: int, concurrency: int, *, stream_share: float = 0.3,
                   max_tokens: int = 8, hang_s: float = 20.0, seed: int = 1, tally: Tally | None = None,
                   stop: threading.Event | None = None, headers: dict[str, str] | None = None) -> Tally:
    """``n`` requests (or until ``stop`` is set), prompts sharing 16 prefixes with unique tails."""
    rng = random.Random(seed)
    t = tally if tally is not None else Tally()
    counter = itertools.count()
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        # ``concurrency`` workers pull request numbers: no coroutine per request up front.
        while (i := next(counter)) < n and not (stop is not None and stop.is_set()):
            # A unique tail of several full blocks: the index gains new entries all the time.
            tail = f"question {seed}-{i}: " + " ".join(f"w{rng.randrange(10_000)}" for _ in range(24))
            body = {"model": "sim-model", "prompt": rng.choice(PREFIXES) + tail,
                    "max_tokens": max_tokens, "ignore_eos": True, "stream": rng.random() < stream_share}
            await _one(client, urls[i % len(urls)], body, hang_s, t)

    async with httpx.AsyncClient(timeout=httpx.Timeout(hang_s + 5), limits=limits, trust_env=False,
                                 headers=headers) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return t


def load_in_thread(urls: list[str], n: int, concurrency: int, **kw: Any) -> tuple[threading.Thread, Tally]:
    """Start ``run_load`` in a thread (its own event loop); join the thread, then read the tally."""
    tally = Tally()
    worker = threading.Thread(target=lambda: asyncio.run(run_load(urls, n, concurrency, tally=tally, **kw)),
                              name="fault-load", daemon=True)
    worker.start()
    return worker, tally
