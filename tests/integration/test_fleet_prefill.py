"""Pending prefill per replica, over real HTTP: counted from dispatch to the first byte.

cache_aware's time model (``router.scheduling.cost``) needs, per replica, the requests
sent and not yet answered and their predicted uncached tokens. The forwarder counts them
with ``Fleet.acquire`` and ``Fleet.first_byte``; these tests hold a real uvicorn server's
first chunk back and watch the fleet's snapshot, and check that a failed attempt (retried
elsewhere) and a cancelled one leave nothing behind.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from router.config import RouterConfig
from router.errors import UpstreamError
from router.fleet.registry import Fleet
from router.proxy.client import make_client
from router.proxy.forward import Forwarder
from router.scheduling.model import Candidate
from router.types import BackendId
from tests.support.servers import UvicornThread


class Gate:
    """The engine stand-in's first chunk waits for ``first``, its end for ``end``."""

    def __init__(self) -> None:
        self.first = threading.Event()
        self.end = threading.Event()
        self.status = 200


def engine_app(gate: Gate) -> Starlette:
    async def wait(event: threading.Event) -> None:
        await asyncio.to_thread(event.wait, 10)  # set from the test's thread, bounded

    async def completions(request: Request) -> Response:
        await request.body()
        if gate.status != 200:
            return JSONResponse({"error": {"message": "down", "type": "server_error", "code": None}},
                                status_code=gate.status)

        async def body() -> AsyncIterator[bytes]:
            await wait(gate.first)  # the prefill
            yield b'data: {"choices": [{"text": "a"}]}\n\n'
            await wait(gate.end)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


@pytest.fixture
def servers() -> Iterator[list[tuple[Gate, UvicornThread]]]:
    out = []
    for _ in range(2):
        gate = Gate()
        out.append((gate, UvicornThread(engine_app(gate)).start()))
    try:
        yield out
    finally:
        for gate, srv in out:
            gate.first.set()
            gate.end.set()
            srv.stop()


def snapshot(fleet: Fleet) -> dict[BackendId, Candidate]:
    return {c.id: c for c in fleet.candidates("m", {})}


async def until(cond: Callable[[], bool], within: float = 5.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < within, "condition not met in time"
        await asyncio.sleep(0.01)


def setup(urls: list[str]) -> tuple[Fleet, Forwarder]:
    config = RouterConfig.model_validate({"backends": [{"url": u, "models": ["m"]} for u in urls]})
    fleet = Fleet(config)
    return fleet, Forwarder(make_client(config.proxy, config.timeouts), fleet, config)


async def test_prefill_is_pending_from_dispatch_to_the_first_byte(servers: list[tuple[Gate, UvicornThread]]) -> None:
    (gate, srv), _ = servers
    fleet, fwd = setup([srv.url])
    a = BackendId(srv.url)
    try:
        opening = asyncio.create_task(fwd.open([a], "/v1/completions", b"{}", {"content-type": "application/json"},
                                               stream=True, deadline=time.monotonic() + 10, prefill=lambda b: 581))
        await until(lambda: snapshot(fleet)[a].prefilling == 1)
        c = snapshot(fleet)[a]
        assert (c.in_flight, c.prefill_tokens) == (1, 581)
        gate.first.set()
        opened = await opening
        c = snapshot(fleet)[a]
        assert (c.in_flight, c.prefilling, c.prefill_tokens) == (1, 0, 0)  # decoding: no prefill ahead
        gate.end.set()
        rest = [chunk async for chunk in fwd.rest(opened, time.monotonic() + 10)]
        assert b"[DONE]" in b"".join(rest)
        await fwd.close(opened, ok=True)
        c = snapshot(fleet)[a]
        assert (c.in_flight, c.prefilling, c.prefill_tokens) == (0, 0, 0)
    finally:
        await fwd.client.aclose()


async def test_a_failed_or_cancelled_attempt_leaves_no_pending_prefill(
    servers: list[tuple[Gate, UvicornThread]]
) -> None:
    (bad_gate, bad), (gate, good) = servers
    bad_gate.status = 503
    fleet, fwd = setup([bad.url, good.url])
    a, b = BackendId(bad.url), BackendId(good.url)
    tokens = {a: 300, b: 581}  # each replica's own prediction: b holds less of the prompt
    try:
        opening = asyncio.create_task(fwd.open([a, b], "/v1/completions", b"{}", {}, stream=True,
                                               deadline=time.monotonic() + 10, prefill=tokens.__getitem__))
        await until(lambda: snapshot(fleet)[b].prefilling == 1)
        assert snapshot(fleet)[b].prefill_tokens == 581
        assert (snapshot(fleet)[a].prefilling, snapshot(fleet)[a].prefill_tokens) == (0, 0)  # retried elsewhere
        opening.cancel()  # the client left before the first byte
        with pytest.raises(asyncio.CancelledError):
            await opening
        for c in snapshot(fleet).values():
            assert (c.in_flight, c.prefilling, c.prefill_tokens) == (0, 0, 0)
        bad_gate.status, gate.status = 503, 503
        with pytest.raises(UpstreamError):
            await fwd.open([a, b], "/v1/completions", b"{}", {}, stream=True, deadline=time.monotonic() + 10,
                           prefill=tokens.__getitem__)
        for c in snapshot(fleet).values():
            assert (c.in_flight, c.prefilling, c.prefill_tokens) == (0, 0, 0)
    finally:
        await fwd.client.aclose()
