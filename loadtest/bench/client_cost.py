"""CPU per proxied POST of the upstream client alone: the router's clients (h1, aiohttp)
vs a minimal keep-alive HTTP/1.1 client on ``asyncio.Protocol`` + httptools' response parser.

``python -m loadtest.bench.client_cost [--requests 10000] [--concurrency 1,32] [--sizes 100,2000]``
starts nginx (fixed answers, as in ``loadtest.overhead``) and posts the same body with each
client, interleaved, printing CPU µs per request (best of 3 rounds). aiohttp and h1 run
through the router's ``UpstreamClient`` interface (``router.proxy.client.make_client``, open
then read), as forward.py uses them. The minimal client is a measuring stick (the floor),
not the router's: it has no timeouts, retries on stale connections, flow control or error
mapping.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httptools
import uvloop

from loadtest.bench import targets as tg
from loadtest.bench.procs import free_port
from loadtest.bench.prompts import completion_body
from router.config import ProxyConfig, TimeoutsConfig
from router.proxy.client import make_client


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.BaseTransport | None = None
        self.body: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.done: asyncio.Future[bytes] | None = None
        self.keep_alive = False

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
        # Only valid inside this callback: once it returns llhttp resets for the next message and
        # should_keep_alive() answers False (asking later made this stick reconnect every request).
        self.keep_alive = self.parser.should_keep_alive()
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
        if conn.keep_alive:
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
    url = backend + "/v1/completions"
    timeouts = TimeoutsConfig()
    clients = {name: make_client(ProxyConfig(client=name), timeouts) for name in ("h1", "aiohttp")}
    minimal = MinimalClient(backend)

    def via(name: str) -> object:
        client = clients[name]

        async def call() -> None:
            resp = await client.open(url, body, headers)
            try:
                assert resp.status == 200 and await resp.read()
            finally:
                await resp.aclose()
        return call

    async def via_minimal() -> None:
        await minimal.post("/v1/completions", body, [*headers.items(), ("accept-encoding", "identity")])

    calls = {"minimal": via_minimal, "aiohttp": via("aiohttp"), "h1": via("h1")}
    for call in calls.values():  # warm-up: connections, first-call costs
        await _run("warm", call, 500, concurrency)
    results: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(3):
        for name, call in calls.items():
            results[name].append(await _run(name, call, n, concurrency))
    for client in clients.values():
        await client.aclose()
    for name, cpu in results.items():
        print(f"{name:>8}: {size:>5} tok body, concurrency {concurrency:>3}: CPU {min(cpu):5.0f} µs/request "
              "(best of 3; all: " + ", ".join(f"{c:.0f}" for c in cpu) + ")", flush=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.bench.client_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--concurrency", default="1,32", help="comma-separated")
    ap.add_argument("--sizes", default="100,2000", help="prompt tokens, comma-separated")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cr-client-") as tmp, \
            tg.nginx_proc(Path(tmp), free_port(), {}) as backend:
        for size in (int(s) for s in args.sizes.split(",")):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                uvloop.run(_measure(backend, size, args.requests, concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
