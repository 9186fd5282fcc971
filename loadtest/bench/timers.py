"""What a deadline costs per request: ``asyncio.timeout``, a loop timer, ``router.proxy.deadlines``.

``python -m loadtest.bench.timers [--n 200000]`` runs each way of bounding a block in a uvloop
task ``--n`` times, with 32 other watched blocks pending (as at 32 connections), and prints
µs per use and the ratio to ``asyncio.timeout``. "stream chunk" is the idle deadline of a
streamed answer, re-armed before each upstream read and disarmed while the client takes
the chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from router.proxy.deadlines import Deadlines


async def _timeout(n: int) -> None:
    for _ in range(n):
        async with asyncio.timeout(300.0):  # noqa: ASYNC100 (the cost of the bound alone)
            pass


async def _timer(n: int) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for _ in range(n):
        handle = loop.call_at(loop.time() + 300.0, task.cancel)
        handle.cancel()


async def _deadlines(n: int, d: Deadlines) -> None:
    for _ in range(n):
        with d.within(300.0):
            pass


async def _chunk_timeout(n: int) -> None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(None) as cm:  # noqa: ASYNC100 (the cost of the bound alone)
        for _ in range(n):
            cm.reschedule(loop.time() + 120.0)
            cm.reschedule(None)


async def _chunk_deadlines(n: int, d: Deadlines) -> None:
    with d.within(None) as watch:
        for _ in range(n):
            watch.at = d.now() + 120.0
            watch.at = None


async def _main(n: int) -> None:
    d = Deadlines()
    others = asyncio.Event()

    async def pending() -> None:
        with d.within(300.0):
            await others.wait()

    background = [asyncio.create_task(pending()) for _ in range(32)]
    await asyncio.sleep(0)
    cases: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = [
        ("asyncio.timeout", lambda: _timeout(n)),
        ("loop timer (call_at + cancel)", lambda: _timer(n)),
        ("Deadlines.within", lambda: _deadlines(n, d)),
        ("stream chunk: timeout.reschedule x2", lambda: _chunk_timeout(n)),
        ("stream chunk: watch.at x2", lambda: _chunk_deadlines(n, d)),
    ]
    base: float | None = None
    for name, case in cases:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            await case()
            best = min(best, (time.perf_counter() - t0) / n * 1e6)
        base = base or best
        print(f"  {name:38} {best:6.2f} µs   x{best / base:.2f}")
    others.set()
    await asyncio.gather(*background)
    d.close()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.bench.timers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    args = ap.parse_args(argv)
    uvloop.run(_main(max(1, min(args.n, 5_000_000))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
