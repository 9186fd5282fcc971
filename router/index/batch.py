"""Group commit for index writes: every write submitted in one event-loop turn goes out as one pipeline.

Under load many requests finish dispatch in the same turn; each would otherwise pay its
own round trip to Redis. A caller still awaits its own write (read-your-writes holds),
but shares the round trip with its neighbours. Owns only the batching; what a write is
and how a batch is sent belong to the backend's ``flush`` callable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from router.types import BackendId

log = logging.getLogger(__name__)
Op = tuple[BackendId, list[Any]]


class WriteBatcher:
    def __init__(self, flush: Callable[[list[Op]], Awaitable[None]], *,
                 deadline_s: float | Callable[[], float] = 1.0) -> None:
        self._flush = flush
        self._deadline = deadline_s
        self._ops: list[Op] = []
        self._done: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, replica: BackendId, args: list[Any]) -> None:
        if self._done is None:
            loop = asyncio.get_running_loop()
            self._done = loop.create_future()
            # nobody may await a failed batch (all callers timed out): never leave it unretrieved
            self._done.add_done_callback(lambda f: f.cancelled() or f.exception())
            loop.call_soon(self._start_flush)
        self._ops.append((replica, args))
        # shield: a caller giving up (its deadline) must not cancel its neighbours' write
        await asyncio.shield(self._done)

    def _start_flush(self) -> None:
        ops, done = self._ops, self._done
        self._ops, self._done = [], None
        assert done is not None
        task = asyncio.get_running_loop().create_task(self._run(ops, done), name="index-write-flush")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, ops: list[Op], done: asyncio.Future[None]) -> None:
        try:
            deadline = self._deadline() if callable(self._deadline) else self._deadline
            async with asyncio.timeout(deadline):
                await self._flush(ops)
        except BaseException as exc:  # handed to every waiter; the task itself ends cleanly
            if not isinstance(exc, Exception):
                done.cancel()
                raise
            if not done.done():
                done.set_exception(exc)
        else:
            if not done.done():
                done.set_result(None)

    async def close(self) -> None:
        """Let writes already submitted finish (each is bounded by the deadline)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
