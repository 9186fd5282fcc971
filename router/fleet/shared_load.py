"""In-flight counts shared between router replicas through Redis, so N routers do not all pick
the same "least loaded" replica in the same instant.

Every ``interval_s`` each router writes its own per-backend in-flight counts (with an expiry)
and reads the sum of every other live router's in one Lua call, which it stores in
``Backend.shared_in_flight`` (the fleet adds it to its own count in candidates). A router
that dies stops refreshing: its counts expire within ``ttl_s``. A router that stops
cleanly deletes its own at once.

Fail-open: if Redis does not answer, the last figures are kept for ``ttl_s``, then dropped to
zero (this router routes on its own counts and engine-reported load); one log line per
change of state. Owns only this exchange, not the counts themselves (``Fleet`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

from router.config import RouterConfig
from router.fleet.backend import Backend
from router.index import keys as K
from router.index.connection import FAILURES, connect
from router.tasks import cancel_and_wait

log = logging.getLogger("cache_router.shared_load")

INTERVAL_S = 0.5
"""Refresh period: a burst is visible to the other routers within half a second; one small
script call per router per period costs Redis nothing."""
TTL_S = 3.0
"""A router silent this long (six missed refreshes) is dead: its counts no longer count."""
DEADLINE_S = 0.05
"""Off the request path, so more generous than the index's deadline; still short enough
that a paused Redis never delays the next refresh by much."""


GOODBYE_S = 1.0
"""Shutdown is off every request's path: the goodbye may take longer than a refresh."""


def default_router_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}".replace("|", "_")


class SharedLoad:
    def __init__(
        self,
        client: Any,
        *,
        namespace: str,
        backends: Callable[[], Iterable[Backend]],
        router_id: str | None = None,
        interval_s: float = INTERVAL_S,
        ttl_s: float = TTL_S,
        deadline_s: float = DEADLINE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._r = client
        self._key = K.shared_load(namespace)
        self._backends = backends
        self.router_id = (router_id or default_router_id()).replace("|", "_")
        self._interval, self._ttl, self._deadline = interval_s, ttl_s, deadline_s
        self._clock = clock
        self._script = client.register_script(
            resources.files("router.index").joinpath("lua/shared_load.lua").read_text()
        )
        self._last_ok = clock()
        self._failing = False
        self._published: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_config(
        cls, config: RouterConfig, backends: Callable[[], Iterable[Backend]]
    ) -> SharedLoad | None:
        """None when no Redis is configured: a single router has nothing to share."""
        if config.redis_url is None:
            return None
        client, _ = connect(
            config.redis_url,
            deadline_ms=DEADLINE_S * 1000,
            cluster=True if config.index.cluster else None,
            max_connections=4,
        )
        return cls(client, namespace=config.index.namespace, backends=backends)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="shared-load")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._published:  # leave cleanly: the others stop counting us at once
            with contextlib.suppress(*FAILURES):
                async with asyncio.timeout(max(self._deadline, GOODBYE_S)):
                    await self._r.hdel(self._key, *(f"{self.router_id}|{b}" for b in self._published))
        await self._r.aclose()

    async def sync_once(self) -> bool:
        """Publish ours, read theirs. False (and figures kept or faded) when Redis did not answer."""
        backends = list(self._backends())
        args: list[Any] = [self.router_id, round(self._ttl * 1000)]
        for b in backends:
            args += [b.id, b.in_flight]
        try:
            async with asyncio.timeout(self._deadline):
                reply = await self._script(keys=[self._key], args=args)
        except FAILURES as exc:
            if not self._failing:
                log.warning("shared load: redis unavailable, routing on this router's counts: %r", exc)
                self._failing = True
            if self._clock() - self._last_ok > self._ttl:
                for b in backends:
                    b.shared_in_flight = 0
            return False
        if self._failing:
            log.info("shared load: redis answers again")
            self._failing = False
        self._last_ok = self._clock()
        self._published = {b.id for b in backends}
        others = {reply[i].decode(): int(reply[i + 1]) for i in range(0, len(reply), 2)}
        for b in backends:
            b.shared_in_flight = others.get(b.id, 0)
        return True

    async def _run(self) -> None:
        try:
            while True:
                await self.sync_once()
                await asyncio.sleep(self._interval)
        except asyncio.CancelledError:
            log.info("shared-load stopped: shutdown")
            raise
        except Exception:
            log.exception("shared-load stopped: crashed")
            raise
