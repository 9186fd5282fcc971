"""CPU per proxied POST of the upstream client alone: aiohttp (the router's) vs a minimal
keep-alive HTTP/1.1 client on ``asyncio.Protocol`` + httptools' response parser.

``python -m loadtest.bench.client_cost [--requests 20000] [--concurrency 32] [--size 2000]``
starts nginx (fixed answers, as in ``loadtest.overhead``) and posts the same body with each
client, interleaved, printing CPU µs per request. The minimal client is a measuring stick
(what a leaner upstream client could save), not the router's: it has no timeouts, retries
on stale connections, flow control or error mapping.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import httptools
import uvloop

from loadtest.bench import targets as tg
from loadtest.bench.procs import free_port
from loadtest.bench.prompts import completion_body


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.BaseTransport | None = None
        self.body: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.done: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's TCPTransport is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.done is not None
        self.done.set_result(b"".join(self.body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("closed"))


class MinimalClient:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.idle: list[_Conn] = []

    async def post(self, path: str, body: bytes, headers: list[tuple[str, str]]) -> bytes:
        loop = asyncio.get_running_loop()
        conn = self.idle.pop() if self.idle else (await loop.create_connection(_Conn, self.host, self.port))[1]
        conn.body, conn.headers, conn.done = [], [], loop.create_future()
        head = "".join(f"{k}: {v}\r\n" for k, v in headers)
        request = f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\n{head}content-length: {len(body)}\r\n\r\n"
        conn.transport.write(request.encode() + body)  # type: ignore[union-attr]
        out = await conn.done
        if conn.parser.get_status_code() != 200:
            raise RuntimeError(f"nginx answered {conn.parser.get_status_code()}")
        if conn.parser.should_keep_alive():
            self.idle.append(conn)
        return out


async def _run(name: str, call: object, n: int, concurrency: int) -> float:
    left = iter(range(n))

    async def worker() -> None:
        for _ in left:
            await call()  # type: ignore[operator]

    cpu = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - cpu) / n * 1e6


async def _measure(backend: str, size: int, n: int, concurrency: int) -> None:
    body = completion_body(size).replace("__UNIQUE__", "x").encode()
    headers = {"content-type": "application/json", "x-request-id": "bench-1"}
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4096, limit_per_host=0),
                                    auto_decompress=False, headers={"accept-encoding": "identity"},
                                    trust_env=False, skip_auto_headers=("User-Agent",))
    minimal = MinimalClient(backend)

    async def via_aiohttp() -> None:
        async with session.post(backend + "/v1/completions", data=body, headers=headers) as resp:
            assert resp.status == 200 and await resp.read()

    async def via_minimal() -> None:
        await minimal.post("/v1/completions", body, [*headers.items(), ("accept-encoding", "identity")])

    for call in (via_aiohttp, via_minimal):  # warm-up: connections, first-call costs
        await _run("warm", call, 500, concurrency)
    results: dict[str, list[float]] = {"aiohttp": [], "minimal": []}
    for _ in range(3):
        results["aiohttp"].append(await _run("aiohttp", via_aiohttp, n, concurrency))
        results["minimal"].append(await _run("minimal", via_minimal, n, concurrency))
    await session.close()
    for name, cpu in results.items():
        print(f"{name:>8}: {size} tok body, CPU {min(cpu):5.0f} µs/request (best of 3; all: "
              + ", ".join(f"{c:.0f}" for c in cpu) + ")", flush=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.bench.client_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--size", type=int, default=2000)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cr-client-") as tmp, \
            tg.nginx_proc(Path(tmp), free_port(), {}) as backend:
        uvloop.run(_measure(backend, args.size, args.requests, args.concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
