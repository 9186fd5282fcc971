"""CPU per request of cache-router's ASGI app without an HTTP server in front of it.

``python -m loadtest.bench.inprocess [--sizes 100,2000] [--requests 3000] [--concurrency 32]``
starts nginx (fixed answers, as in ``loadtest.overhead``), runs ``create_app`` with its
lifespan in this process, and calls the app directly with 32 concurrent requests: the real
path (parse, tokenize, hash, index, scheduler, upstream client to nginx, answer, feedback,
metrics) minus uvicorn. It prints requests/s, CPU µs per request (all threads) and the event
loop thread's share. Less noisy than wrk on a busy machine: no load generator shares the cores.
It takes the app's ASGI path for the two hot routes; ``serve`` runs them on its own server
protocol instead (``router.api.hot``), which costs less: the routing work is the same.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

import router.request.prompt as prompt_module
from loadtest.bench import targets as tg
from loadtest.bench.procs import free_port
from loadtest.bench.prompts import completion_body
from router.app import create_app
from router.config import load_config


async def _one(app: Any, body: bytes) -> int:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {}, "app": app,
             "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    sent = False
    done = asyncio.Event()
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif not message.get("more_body"):
            done.set()

    await app(scope, receive, send)
    return status


async def _measure(backend: str, size: int, n: int, concurrency: int) -> str:
    config = load_config(None, tokenizer=str(tg.MODEL_DIR), backends=[{"url": backend}], log_decisions=False)
    app = create_app(config)
    template = completion_body(size)
    async with app.router.lifespan_context(app):
        for i in range(200):  # warm-up: pool, segment cache, first-request costs
            await _one(app, template.replace("__UNIQUE__", f"w{i}").encode())
        bodies = iter([template.replace("__UNIQUE__", str(i)).encode() for i in range(n)])
        failed = 0

        async def worker() -> None:
            nonlocal failed
            for body in bodies:
                failed += await _one(app, body) != 200

        cpu0, wall0, loop0 = time.process_time(), time.perf_counter(), time.thread_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu, wall, loop = time.process_time() - cpu0, time.perf_counter() - wall0, time.thread_time() - loop0
    return (f"{size:>6} tok: {n / wall:7,.0f} req/s, CPU {cpu / n * 1e6:6,.0f} µs/request "
            f"(event loop thread {loop / n * 1e6:,.0f})" + (f", {failed} failed" if failed else ""))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.bench.inprocess", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,2000")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--thread-threshold", type=int, help="override THREAD_THRESHOLD_CHARS (0: every prompt)")
    args = ap.parse_args(argv)
    if args.thread_threshold is not None:
        prompt_module.THREAD_THRESHOLD_CHARS = args.thread_threshold
    with tempfile.TemporaryDirectory(prefix="cr-inprocess-") as tmp:
        port = free_port()
        with tg.nginx_proc(Path(tmp), port, {}) as backend:
            for size in (int(s) for s in args.sizes.split(",")):
                print(uvloop.run(_measure(backend, size, args.requests, args.concurrency)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
