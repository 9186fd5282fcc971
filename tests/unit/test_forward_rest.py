"""Forwarder.rest: a streamed answer's idle deadline is the replica's silence, not the client's pace."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from router.proxy.client import TimedOut
from router.proxy.forward import Forwarder, Opened
from tests.support.router import router_config

IDLE = 0.05


def _forwarder() -> Forwarder:
    config = router_config(["http://127.0.0.1:9"], timeouts={"idle_s": IDLE})
    forwarder = Forwarder(None, None, config)  # type: ignore[arg-type]  # rest() uses neither
    forwarder.deadlines.tick_s = 0.01
    return forwarder


def _opened(chunks: AsyncIterator[bytes]) -> Opened:
    return Opened("http://replica", 200, [], b"first", None, chunks, 1, time.monotonic())


async def test_a_slow_client_is_not_an_idle_replica() -> None:
    async def replica() -> AsyncIterator[bytes]:
        for i in range(3):
            yield b"chunk %d" % i  # at once: the replica is never idle

    got = []
    async for chunk in _forwarder().rest(_opened(replica()), time.monotonic() + 10):
        got.append(chunk)
        await asyncio.sleep(4 * IDLE)  # the client takes its time with each chunk
    assert got == [b"chunk 0", b"chunk 1", b"chunk 2"]


async def test_a_silent_replica_is_cut_after_the_idle_timeout() -> None:
    async def replica() -> AsyncIterator[bytes]:
        yield b"chunk 0"
        await asyncio.sleep(10)
        yield b"never"

    got = []
    t0 = time.monotonic()
    with pytest.raises(TimedOut):
        async for chunk in _forwarder().rest(_opened(replica()), time.monotonic() + 10):
            got.append(chunk)
    assert got == [b"chunk 0"]
    assert time.monotonic() - t0 < IDLE + 0.5
