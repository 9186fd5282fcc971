"""``create_app(config)``: the routes, and a lifespan that starts and stops every part.

Start order: index, fleet, discovery (its first list; then one probe round so the router is
ready before traffic),
scheduler, KV-event ingest (when any replica has events configured), the shared HTTP
client, the index-size task. Stop order is the reverse. Nothing starts at import.

Wiring between parts lives here and nowhere else: a replica removed or restarted has its
index entries cleared; a capacity learned from the engine bounds its entries (config wins).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from router.api import hot_routes, routes
from router.api.errors import Endpoint, guarded, http_exception, unhandled
from router.config import RouterConfig
from router.events.ingest import EventIngest
from router.fleet.discovery import Discovery
from router.fleet.registry import Fleet
from router.fleet.shared_load import SharedLoad
from router.index import factory
from router.index.base import BlockIndex, IndexUnavailable
from router.index.peers import PEER_DIR_ENV, Peers
from router.index.resilient import ResilientIndex
from router.liveness import LivenessListener
from router.looplag import LoopLag
from router.pipeline import Pipeline
from router.proxy.client import make_client
from router.proxy.forward import Forwarder
from router.request.prompt import PromptEncoder
from router.scheduling import Scheduler
from router.tasks import cancel_and_wait
from router.types import BackendId

log = logging.getLogger("cache_router.app")

INDEX_SIZES_INTERVAL_S = 5.0
"""How often expired entries are purged and index sizes exported: a dashboard refresh."""
DISCOVERY_SYNC_S = 10.0
"""How long start-up waits for discovery's first full list: long enough for a slow API server,
short enough that a liveness probe does not kill a router whose API server is down."""


def make_index(config: RouterConfig, lag: LoopLag | None = None) -> BlockIndex:
    """The configured index, always behind ResilientIndex: it owns the index metrics
    (lookup latency, errors, degraded, sizes) for every backend, so nobody counts twice.
    ``lag``: Redis deadlines stretch by this loop's own delay (router.looplag)."""
    index: BlockIndex = factory.make_index(config, slack=lag.slack if lag is not None else lambda: 0.0)
    return index if isinstance(index, ResilientIndex) else ResilientIndex(index)


def make_peers(index: BlockIndex, fleet: Fleet) -> Peers | None:
    """This worker's link to its siblings when ``serve --workers N`` runs without Redis (the
    parent names a directory in the environment): they share the in-process index's writes."""
    directory = os.environ.get(PEER_DIR_ENV)
    local = index.local if isinstance(index, ResilientIndex) else None
    if not directory or local is None:
        return None
    return Peers(directory, local, fleet.backends)


def make_ingest(config: RouterConfig, index: BlockIndex, fleet: Fleet) -> EventIngest | None:
    """KV-event ingest when any replica has events configured (precise mode); else None."""
    wanted = (config.kv_events_bind is not None or config.discovery.kv_events_port is not None
              or any(b.kv_events or b.kv_topic for b in config.backends))
    if not wanted or config.index.mode == "approximate":
        return None
    return EventIngest(config, index, fleet)


async def _index_sizes(index: BlockIndex) -> None:
    """Purge expired entries and refresh per-replica sizes (the wrapper exports them), forever."""
    while True:
        with contextlib.suppress(IndexUnavailable):
            await index.purge_expired()
            await index.sizes()
        await asyncio.sleep(INDEX_SIZES_INTERVAL_S)


async def _run_named(name: str, coro: Any) -> None:
    try:
        await coro
    except asyncio.CancelledError:
        log.info("%s stopped: shutdown", name)
        raise
    except Exception:
        log.exception("%s stopped: crashed", name)


def _wire(config: RouterConfig, index: BlockIndex, fleet: Fleet) -> None:
    configured = {b.url: b.capacity_blocks for b in config.backends if b.capacity_blocks is not None}

    async def cleared(backend: BackendId) -> None:
        with contextlib.suppress(IndexUnavailable):  # fail open; the wrapper counts it
            n = await index.clear(backend)
            log.info("index: cleared %d entries of %s", n, backend)

    async def capacity(backend: BackendId, blocks: int) -> None:
        if backend in configured:
            return  # an operator's number wins over the engine's
        with contextlib.suppress(IndexUnavailable):
            await index.set_capacity(backend, blocks)

    fleet.on_removed(cleared)
    fleet.on_restart(cleared)
    fleet.on_capacity(capacity)


class RouterApp(Starlette):
    """Starlette, with the two OpenAI POST endpoints dispatched before its middleware stack.

    Their endpoints already turn every error into an answer (``errors.guarded``) and their
    response object catches what escapes while streaming, so Starlette's error middleware
    and router only added two ``send`` wrappers and a route walk per request: about 5% of
    the router's CPU on a 2k-token completion (py-spy, wrk at 32 connections). Every other
    path, method and the lifespan go through Starlette as before.
    """

    serves_hot: ClassVar[bool] = True
    """``router.api.protocol`` may serve the hot routes itself (``router.api.hot``), with
    ``state.pipeline``; this ``__call__`` is their path on any other ASGI server."""

    _HOT: ClassVar[dict[str, Endpoint]] = {path: guarded(endpoint) for path, endpoint in hot_routes().items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self._HOT.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self
                response = await endpoint(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(config: RouterConfig, *, freeze_gc: bool = False) -> Starlette:
    """The router's ASGI app. ``freeze_gc`` (the ``serve`` command, one app per process): once
    started, move everything allocated so far out of the garbage collector's reach
    (``gc.freeze``): modules, tokenizers, templates and the app live as long as the process, and
    a full collection that scans them stalls every request in flight (47-95 ms in the demo's
    routers, 42 ms at start; 0 after, docs/overhead.md). Tests that build many apps in one
    process leave it off: frozen garbage is never freed."""
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        liveness = LivenessListener(config.host, config.health_port) if config.health_port is not None else None
        if liveness is not None:
            await liveness.start()  # first: a liveness probe during start-up gets its answer
        lag = LoopLag()
        await lag.start()
        index = make_index(config, lag)
        fleet = Fleet(config)
        _wire(config, index, fleet)
        for b in fleet.backends():
            blocks = next((c.capacity_blocks for c in config.backends if c.url == b.id), None)
            blocks = blocks or config.index.default_capacity_blocks
            if blocks is not None:
                with contextlib.suppress(IndexUnavailable):
                    await index.set_capacity(b.id, blocks)
        await fleet.start()
        discovery = Discovery(config, fleet)
        await discovery.start()
        with contextlib.suppress(TimeoutError):  # serve what is known; discovery keeps filling in
            async with asyncio.timeout(DISCOVERY_SYNC_S):
                await discovery.synced.wait()
        await fleet.probe_all()
        # Other router replicas' in-flight counts (Redis), so N routers do not all pick the
        # same "least loaded" replica in the same instant. None without Redis.
        shared = SharedLoad.from_config(config, fleet.backends)
        if shared is not None:
            await shared.start()
        scheduler = Scheduler(config.scheduling, config.policy, random.Random())
        ingest = make_ingest(config, index, fleet)
        if ingest is not None:
            await ingest.start()
        peers = make_peers(index, fleet)
        if peers is not None:
            await peers.start()
        client = make_client(config.proxy, config.timeouts)
        pipeline = Pipeline(config, index, fleet, scheduler, PromptEncoder(config),
                            Forwarder(client, fleet, config), peers=peers)
        app.state.pipeline = pipeline
        app.state.ingest = ingest
        sizes = asyncio.create_task(_run_named("index-sizes", _index_sizes(index)), name="index-sizes")
        if freeze_gc:
            gc.collect()
            gc.freeze()
        log.info("cache-router ready: %d replicas, policy %s, index %s, %s", len(fleet.backends()),
                 config.policy, index.name, "tokenizer" if config.tokenizer else "approximate character mode")
        try:
            yield
        finally:
            await cancel_and_wait(sizes)
            await pipeline.drain()
            if peers is not None:
                await peers.stop()
            await discovery.stop()
            if ingest is not None:
                await ingest.stop()
            if shared is not None:
                await shared.stop()
            await fleet.stop()
            await client.aclose()
            await index.close()
            await lag.stop()
            if liveness is not None:
                await liveness.stop()

    return RouterApp(routes=routes(), lifespan=lifespan,
                     exception_handlers={HTTPException: http_exception, Exception: unhandled})
