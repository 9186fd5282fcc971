"""One elected KV-event ingester per shared Redis index: a lease with expiry.

Why: with N router replicas on one Redis, every router ingesting every engine's events
multiplies each index write by N (the writes are idempotent, so the index would still be
right, but Redis does N times the work and N routers hold N connections per engine). So
the routers elect one ingester; the others only read the index (as they do for routing).

How: the lease is one Redis key set with ``SET NX PX`` holding the holder's random token;
the holder renews it every ``ttl/3`` with a Lua check-and-extend (only while the token is
still its own), and deletes it on a clean stop (check-and-delete). A holder that dies
stops renewing; the key expires after ``ttl`` and the next router to try takes over. The
new ingester knows nothing of the engines' sequence numbers: its first batch from each
engine has seq > 0, which the applier treats as "started late": clear that replica,
replay everything the engine still buffers, continue. A holder that cannot reach Redis
for a whole ``ttl`` steps down by itself, so two ingesters overlap for at most one renew
interval after a partition (both write the same idempotent facts; an older batch applied
late by the deposed one is corrected by the next BlockStored/BlockRemoved or a stale hit).

The ingester also publishes which replicas are precise (a hash with the same expiry);
the other routers copy these flags into their Backend objects, so they record route-time
entries with the short speculative TTL exactly when the ingester keeps a replica exact.

Key formats (kept here, next to their only user; ``router.index.keys`` holds the index's):
``ns:events:{ns|events}:leader`` (string: token) and ``ns:events:{ns|events}:precise``
(hash: replica id -> "1"/"0"); the hash tag keeps both on one Cluster slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

LEASE_TTL_S = 5.0
"""A dead ingester is replaced within this (plus one renew interval); short enough that a
router restart loses a few seconds of events at most (replay then recovers them), long
enough that a GC pause or a slow Redis round trip never flaps the lease."""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
"""


def leader_key(ns: str) -> str:
    return f"{ns}:events:{{{ns}|events}}:leader"


def precise_key(ns: str) -> str:
    return f"{ns}:events:{{{ns}|events}}:precise"


class IngestLease:
    """This router's claim on the ingester role. Every call may raise the client's errors."""

    def __init__(self, client: Any, *, namespace: str, ttl_s: float = LEASE_TTL_S) -> None:
        self._r = client
        self.namespace = namespace
        self.ttl_ms = int(ttl_s * 1000)
        self.token = f"{socket.gethostname()}:{secrets.token_hex(8)}"
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    async def acquire_or_renew(self) -> bool:
        """True while this router holds the lease (taking it if nobody does)."""
        return bool(await self._renew(keys=[leader_key(self.namespace)], args=[self.token, self.ttl_ms]))

    async def release(self) -> None:
        await self._release(keys=[leader_key(self.namespace), precise_key(self.namespace)], args=[self.token])

    async def holder(self) -> str | None:
        value = await self._r.get(leader_key(self.namespace))
        return value.decode() if isinstance(value, bytes) else value

    async def publish_precise(self, flags: Mapping[str, bool]) -> None:
        if not flags:
            return
        key = precise_key(self.namespace)
        pipe = self._r.pipeline(transaction=False)
        pipe.hset(key, mapping={rid: "1" if on else "0" for rid, on in flags.items()})
        pipe.pexpire(key, self.ttl_ms)
        await pipe.execute()

    async def close(self) -> None:
        await self._r.aclose()

    async def read_precise(self) -> dict[str, bool]:
        raw = await self._r.hgetall(precise_key(self.namespace))
        return {_s(k): _s(v) == "1" for k, v in raw.items()}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class IngesterElection:
    """Hold or follow the lease forever: start ingesting when it is ours, stop when it is not.

    Redis unreachable: the holder keeps ingesting until its lease must have expired (then
    another router may hold it), and steps down; followers keep their last flags.
    """

    def __init__(self, lease: IngestLease, *, start: Callable[[], Awaitable[None]],
                 stop: Callable[[], Awaitable[None]], ingesting: Callable[[], bool],
                 flags: Callable[[], Mapping[str, bool]], follow: Callable[[Mapping[str, bool]], None],
                 call_timeout_s: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self.lease = lease
        self._start, self._stop, self._ingesting = start, stop, ingesting
        self._flags, self._follow = flags, follow
        self._timeout = call_timeout_s
        self._clock = clock
        self._warned_at = float("-inf")

    async def run(self) -> None:
        lease, ttl = self.lease, self.lease.ttl_ms / 1000
        renewed_at = float("-inf")
        while True:
            held: bool | None
            try:
                held = await asyncio.wait_for(lease.acquire_or_renew(), self._timeout)
            except Exception as exc:  # Redis down or slow
                held = None
                self._warn(f"cannot reach Redis for the ingester lease: {exc!r}")
            now = self._clock()
            if held:
                renewed_at = now
                if not self._ingesting():
                    log.info("kv events: this router is now the ingester (lease %s)", lease.token)
                    await self._start()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(lease.publish_precise(self._flags()), self._timeout)
            elif held is False or now - renewed_at > ttl:
                if self._ingesting():
                    log.warning("kv events: lost the ingester lease: stopping ingestion here")
                    await self._stop()
                if held is False:
                    with contextlib.suppress(Exception):
                        self._follow(await asyncio.wait_for(lease.read_precise(), self._timeout))
            await asyncio.sleep(ttl / 3)

    def _warn(self, msg: str) -> None:
        now = self._clock()
        if now - self._warned_at > 30:  # one line per 30 s while Redis is away
            self._warned_at = now
            log.warning("kv events: %s", msg)
