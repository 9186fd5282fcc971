"""Start cache-router in-process on a real uvicorn, and scripted upstreams for proxy tests.

    with running_router(backends=[engine.url], tokenizer=str(SIM_MODEL)) as router:
        HTTP.post(router.url + "/v1/completions", json={...})

``running_router`` builds a RouterConfig (keyword overrides, or a full config), serves
``create_app(config)`` with lifespan on 127.0.0.1, and waits for ``/ready``.

``ScriptedEngine`` is a real HTTP server (uvicorn, raw ASGI) that speaks just enough of
vLLM's API for the fleet to find it healthy, and whose answers a test scripts: a slow
first byte, a 5xx, a stream that dies midway, a stream that never ends (to watch a
client's disconnect reach it). Use the simulated engines in ``loadtest.engine`` for
anything about caching; use this for proxy behaviour the simulator does not script.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

from router.api.protocol import UVICORN_OPTIONS
from router.app import create_app
from router.config import RouterConfig
from tests.support.servers import UvicornThread, env_without_proxies, free_port

ADMIN_ENV = "CR_TEST_ADMIN_TOKEN"
ADMIN_TOKEN = os.environ.setdefault(ADMIN_ENV, "test-admin-token")
ADMIN = {"x-admin-token": ADMIN_TOKEN}
"""Admin and debug endpoints are off unless a token is configured: test routers get one
(``auth.admin_token_env``), and the shared client sends it."""

HTTP = httpx.Client(timeout=10, trust_env=False, headers=ADMIN)
"""One client for every test request: creating an httpx client builds an SSL context
(~0.1 s on a busy machine), which used to dominate these tests' run time."""


def router_config(backends: list[str] | list[dict[str, Any]], **overrides: Any) -> RouterConfig:
    """A config for tests: backends as URLs or BackendConfig dicts, plus any top-level keys."""
    entries = [b if isinstance(b, dict) else {"url": b} for b in backends]
    data: dict[str, Any] = {"backends": entries, "port": 0}
    # Fast health rounds so tests see a replica come and go within a second.
    data.setdefault("health", {"interval_s": 0.2, "timeout_s": 0.5, "failure_threshold": 1})
    data.update(overrides)
    auth = dict(data.get("auth") or {})
    if "admin_token_file" not in auth:
        auth.setdefault("admin_token_env", ADMIN_ENV)
    data["auth"] = auth
    return RouterConfig.model_validate(data)


@contextlib.contextmanager
def running_router(config: RouterConfig | None = None, *,
                   backends: list[str] | list[dict[str, Any]] | None = None,
                   wait_ready: bool = True, server: str = "hot", **overrides: Any) -> Iterator[UvicornThread]:
    """``server``: "hot", as ``serve`` runs it (router.api.hot serves the two POST routes), or
    "asgi", uvicorn's own protocol: the app's ASGI path for every route (any other server's)."""
    cfg = config if config is not None else router_config(backends or [], **overrides)
    options = UVICORN_OPTIONS if server == "hot" else {**UVICORN_OPTIONS, "http": "httptools"}
    uv = UvicornThread(create_app(cfg), **options).start()
    try:
        if wait_ready:
            deadline = time.monotonic() + 10
            while HTTP.get(uv.url + "/ready", timeout=2).status_code != 200:
                if time.monotonic() > deadline:
                    raise TimeoutError("router never became ready")
                time.sleep(0.05)
        yield uv
    finally:
        uv.stop()


def serve_process(tmp: Path, config: dict[str, Any], *,
                  timeout: float = 30) -> tuple[subprocess.Popen[bytes], str, Path]:
    """``cache-router serve --config`` as its own process on a free port (for signals, crashes and
    restarts), its output in a log file beside the config; waits for ``/ready``. Returns the
    process, its base URL and the log's path."""
    port = free_port()
    path = tmp / f"router-{port}.yaml"
    path.write_text(yaml.safe_dump({**config, "port": port}))
    log_path = tmp / f"router-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "router", "serve", "--config", str(path)],
                                cwd=Path(__file__).resolve().parents[2], env=env_without_proxies(),
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        with contextlib.suppress(httpx.HTTPError):
            if HTTP.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url, log_path
        assert time.monotonic() < deadline, "router never became ready:\n" + log_path.read_text()[-3000:]
        time.sleep(0.1)


@dataclass
class Script:
    """What the next answers do. ``mode``: ok | status | slow_first | die | endless."""

    mode: str = "ok"
    status: int = 500
    first_byte_delay_s: float = 0.0
    chunks: int = 5
    chunk_interval_s: float = 0.0
    cached_tokens: int = 0
    prompt_tokens: int = 10


@dataclass
class ScriptedEngine:
    model: str = "sim-model"
    script: Script = field(default_factory=Script)
    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnects: int = 0
    finished: int = 0
    server: UvicornThread | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def start(self) -> ScriptedEngine:
        self.server = UvicornThread(self._app, interface="asgi3").start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if scope["method"] == "GET":
            if path == "/v1/models":
                body = orjson.dumps({"object": "list", "data": [{"id": self.model, "object": "model"}]})
            elif path == "/metrics":
                body = b"vllm:num_requests_waiting 0\n"
            else:
                body = b""
            await _answer(send, 200, body)
            return
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        req = orjson.loads(raw)
        self.requests.append(req)
        await self._complete(req, scope, receive, send)

    async def _complete(self, req: dict[str, Any], scope: dict[str, Any], receive: Any, send: Any) -> None:
        s = self.script
        if s.mode == "status":
            await _answer(send, s.status, orjson.dumps({"error": {"message": "scripted failure"}}))
            return
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await self._answer(req, scope, send, watcher)
        finally:
            watcher.cancel()

    async def _answer(self, req: dict[str, Any], scope: dict[str, Any], send: Any,
                      watcher: asyncio.Future[None]) -> None:
        s = self.script
        if s.first_byte_delay_s:
            await asyncio.wait({watcher}, timeout=s.first_byte_delay_s)
            if watcher.done():
                self.disconnects += 1
                return
        usage = {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.chunks,
                 "total_tokens": s.prompt_tokens + s.chunks,
                 "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}
        chat = scope["path"].endswith("chat/completions")
        if not req.get("stream"):
            choice = ({"index": 0, "message": {"role": "assistant", "content": "x" * s.chunks}} if chat
                      else {"index": 0, "text": "x" * s.chunks})
            await _answer(send, 200, orjson.dumps({"id": "r", "object": "x", "model": self.model,
                                                   "choices": [choice], "usage": usage}))
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        n = 10_000 if s.mode == "endless" else s.chunks
        for i in range(n):
            if watcher.done():
                self.disconnects += 1
                return
            delta = {"index": 0, "delta": {"content": f"t{i}"}} if chat else {"index": 0, "text": f"t{i}"}
            chunk = {"id": "r", "object": "chunk", "model": self.model, "choices": [delta]}
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(chunk) + b"\n\n",
                        "more_body": True})
            if s.mode == "die" and i == 1:
                raise RuntimeError("scripted death mid-stream")
            if s.chunk_interval_s:
                await asyncio.wait({watcher}, timeout=s.chunk_interval_s)
        if (req.get("stream_options") or {}).get("include_usage"):
            tail = {"id": "r", "object": "chunk", "model": self.model, "choices": [], "usage": usage}
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(tail) + b"\n\n",
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        self.finished += 1


async def _wait_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _answer(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def scripted_engines(n: int, **script: Any) -> Iterator[list[ScriptedEngine]]:
    engines = [ScriptedEngine(script=Script(**script)).start() for _ in range(n)]
    try:
        yield engines
    finally:
        for e in engines:
            e.stop()


def metric(router_url: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples on the router's /metrics whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = HTTP.get(router_url + "/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def bench_route(n: int = 500) -> None:
    """Print the router's in-process cost of ``Pipeline.route`` (parse excluded): tokenize,
    hash, index lookup, fleet snapshot and scheduling, per prompt size, on 4 fake-healthy
    replicas with a warm in-process index. No HTTP: the proxy's cost is measured end to end
    by ``python -m loadtest overhead``. Run: ``python -m tests.support.router``."""
    import random
    import statistics

    from loadtest.bench.prompts import chat_body, completion_body
    from router.fleet.registry import Fleet
    from router.index.memory import MemoryBlockIndex
    from router.index.resilient import ResilientIndex
    from router.pipeline import Pipeline
    from router.proxy.forward import Forwarder
    from router.request.parse import parse_request
    from router.request.prompt import PromptEncoder
    from router.scheduling import Scheduler
    from tests.conftest import SIM_MODEL

    cfg = router_config([{"url": f"http://127.0.0.1:{9000 + i}", "models": ["sim-model"]} for i in range(4)],
                        tokenizer=str(SIM_MODEL), log_decisions=False)

    async def run() -> None:
        fleet = Fleet(cfg)
        for b in fleet.backends():
            b.healthy = True
        index = ResilientIndex(MemoryBlockIndex())
        pipeline = Pipeline(cfg, index, fleet, Scheduler(cfg.scheduling, "cache_aware", random.Random(0)),
                            PromptEncoder(cfg), Forwarder(None, fleet, cfg))  # type: ignore[arg-type]
        cases = [("completion", 100, completion_body(100)), ("completion", 2000, completion_body(2000)),
                 ("completion", 8000, completion_body(8000)), ("chat", 2000, chat_body(2000))]
        print(f"Pipeline.route, median of {n} requests after {n // 5} warm-up (µs)")
        for kind, size, template in cases:
            bodies = [template.replace("__UNIQUE__", str(i)).encode() for i in range(n + n // 5)]
            times = []
            for i, raw in enumerate(bodies):
                req = parse_request(raw, kind)  # type: ignore[arg-type]
                t0 = time.perf_counter()
                routed = await pipeline.route(req, "bench", None)
                if i >= n // 5:
                    times.append(time.perf_counter() - t0)
                await index.record(routed.decision.backend, routed.gathered.enc.keys, ttl_s=None)
            print(f"  {kind:<10} {size:>5} tokens  {statistics.median(times) * 1e6:8.0f}")

    asyncio.run(run())


if __name__ == "__main__":
    bench_route()
