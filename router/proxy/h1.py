"""A lean keep-alive HTTP/1.1 client to the engines: ``asyncio.Protocol`` + httptools' parser.

Owns: one pool of idle connections per (scheme, host, port) under one limit on open
connections for the whole client, with keep-alive expiry; a POST written as one buffer;
connect and pool-wait timeouts as ``ConnectFailed``; one resend on a fresh connection when a
pooled one turns out to be dead. The socket itself (parsing, streaming with backpressure,
how a lost connection ends an answer) is ``router.proxy.h1_connection``. It refuses to own
time to first byte, idle and total deadlines (``router.proxy.forward`` enforces them by
cancelling the awaiting task), retries across replicas, redirects, cookies and compression
(it asks for identity: bytes are relayed raw).

Why: aiohttp's general-purpose machinery (request/response objects, tracing hooks, timers,
StreamReader) costs 5-7x the CPU of this path per upstream request (about 110-175 µs against
20-27 µs here, ``python -m loadtest.bench.client_cost``); the figures are at ``ProxyConfig.client``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import cast
from urllib.parse import urlsplit

from router.config import ProxyConfig, TimeoutsConfig
from router.proxy.client import ConnectFailed, StreamBroken, UpstreamFailure
from router.proxy.h1_connection import HIGH_WATER, Connection, H1Response, Pool, Stale

_RESERVED = frozenset({"host", "content-length", "transfer-encoding", "connection", "accept-encoding"})
"""Framing headers this module writes itself; a caller's copy would make the request ambiguous."""


class H1Upstream:
    """Keep-alive HTTP/1.1 pools on asyncio.Protocol + httptools, sized like the other clients."""

    def __init__(self, proxy: ProxyConfig, timeouts: TimeoutsConfig) -> None:
        self._max = proxy.max_connections
        self._max_idle = proxy.max_keepalive
        self._expiry = proxy.keepalive_expiry_s
        self._connect_s = timeouts.connect_s
        self._pools: dict[tuple[str, str, int], Pool] = {}
        self._targets: dict[str, tuple[Pool, str]] = {}
        self._conns: set[Connection] = set()  # every open socket, for aclose
        self._idle = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    async def open(self, url: str, body: bytes, headers: Mapping[str, str], *,
                   sent: Callable[[], None] | None = None) -> H1Response:
        target = self._targets.get(url) or self._target(url)
        head = target[1]
        for name, value in headers.items():
            if name.lower() in _RESERVED or "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                raise ValueError(f"header {name!r} cannot be forwarded")
            head += f"{name}: {value}\r\n"
        request = f"{head}content-length: {len(body)}\r\n\r\n".encode("latin-1") + body
        if sent is not None and not target[0].idle:
            sent()  # a connection must be opened first: the caller's work does not wait for that
            sent = None
        conn = await self._acquire(target[0], fresh=False)
        try:
            return await self._send(conn, request, sent)
        except Stale:
            # Not one byte came back on a pooled connection: servers close kept-alive sockets between
            # requests, so the close raced this request and the engine never read it. Resending the
            # POST (bytes in hand) once, on a new connection, is then safe; an engine that died while
            # working refuses the new connection (ConnectFailed), and in the rare wrong guess a
            # completion has no side effect beyond its compute. A failure after any byte, or on a
            # fresh connection, is not resent here: forward.py's retry policy decides.
            conn = await self._acquire(target[0], fresh=True)
            return await self._send(conn, request)

    async def aclose(self) -> None:
        self._closed = True
        for conn in list(self._conns):
            conn.close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- internals --------------------------------------------------------------------------------
    def _target(self, url: str) -> tuple[Pool, str]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConnectFailed(f"not an http(s) URL: {url!r}")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        key = (parts.scheme, parts.hostname, port)
        pool = self._pools.get(key)
        if pool is None:
            ctx = None
            if parts.scheme == "https":
                self._ssl = self._ssl or ssl.create_default_context()
                ctx = self._ssl
            pool = self._pools[key] = Pool(parts.hostname, port, ctx)
        host = parts.netloc.rpartition("@")[2]
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        target = (pool, f"POST {path} HTTP/1.1\r\nhost: {host}\r\naccept-encoding: identity\r\n")
        if len(self._targets) >= 1024:  # replicas x endpoints; bounded in case backends churn
            self._targets.clear()  # (pools stay: an empty one is a few hundred bytes)
        self._targets[url] = target
        return target

    async def _send(self, conn: Connection, request: bytes, sent: Callable[[], None] | None = None) -> H1Response:
        resp = conn.resp = H1Response(conn)
        conn.got_bytes = False
        try:
            cast(asyncio.Transport, conn.transport).write(request)
            if sent is not None:  # the caller's bookkeeping runs while the engine reads the request
                sent()
            while not resp.head_done:
                if resp.error is not None:
                    raise resp.error
                await resp.wait()
        except UpstreamFailure:
            conn.close()
            raise
        except (RuntimeError, OSError) as exc:  # writing to a transport that is already closing
            conn.close()
            raise (Stale if conn.reused else StreamBroken)(type(exc).__name__) from None
        except BaseException:  # cancelled (first-byte deadline, client gone): the request is in flight
            conn.close()
            raise
        return resp

    async def _acquire(self, pool: Pool, *, fresh: bool) -> Connection:
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            if self._closed:
                raise ConnectFailed("the upstream client is closed")
            if not fresh and pool.idle:
                now = time.monotonic()
                while pool.idle:
                    conn = next(reversed(pool.idle))  # the most recently used is the least likely stale
                    del pool.idle[conn]
                    self._idle -= 1
                    if now - conn.idle_since < self._expiry and not conn.closed:
                        conn.reused = True
                        return conn
                    conn.close()
            if len(self._conns) < self._max:
                return await self._connect(pool, loop)
            if self._evict_one():
                continue
            deadline = deadline or loop.time() + self._connect_s
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                raise ConnectFailed(f"no free connection within {self._connect_s:g}s") from None
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # pass on the slot this task was given but will not use
                raise

    async def _connect(self, pool: Pool, loop: asyncio.AbstractEventLoop) -> Connection:
        conn = Connection(self, pool)
        self._conns.add(conn)
        try:
            async with asyncio.timeout(self._connect_s):
                await loop.create_connection(lambda: conn, pool.host, pool.port, ssl=pool.ssl)
        except TimeoutError:
            conn.close()
            raise ConnectFailed(f"connect to {pool.host}:{pool.port} timed out") from None
        except OSError as exc:  # refused, unreachable, name not resolved, TLS handshake failed
            conn.close()
            raise ConnectFailed(f"connect to {pool.host}:{pool.port}: {type(exc).__name__}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def release(self, conn: Connection) -> None:
        """A finished answer: keep the socket for the next request if the server and the limits allow."""
        if conn.closed or not conn.parser.should_keep_alive() or self._idle >= self._max_idle or self._closed:
            conn.close()
            return
        conn.resume()
        now = conn.idle_since = time.monotonic()
        idle = conn.pool.idle
        idle[conn] = None
        self._idle += 1
        oldest = next(iter(idle))  # expire lazily, one per release: no background task needed
        if now - oldest.idle_since >= self._expiry:
            oldest.close()
        self._wake()

    def forget(self, conn: Connection) -> None:
        if conn.pool.idle.pop(conn, 0) is None:
            self._idle -= 1
        if conn.counted:
            conn.counted = False
            self._conns.discard(conn)
            self._wake()

    def _evict_one(self) -> bool:
        """At the connection limit: close an idle connection to any replica to make room."""
        for pool in self._pools.values():
            if pool.idle:
                next(iter(pool.idle)).close()
                return True
        return False

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


__all__ = ["HIGH_WATER", "H1Upstream"]
