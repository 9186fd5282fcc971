"""A lean keep-alive HTTP/1.1 client to the engines: ``asyncio.Protocol`` + httptools' parser.

Owns: one pool of idle connections per (scheme, host, port) under one limit on open
connections for the whole client; a POST written as one buffer; the answer parsed by
httptools (chunked decoding, 1xx, 204/304, bodies that end when the server closes);
the body streamed as it arrives with backpressure; transport failures translated into
``ConnectFailed`` / ``StreamBroken``; one resend on a fresh connection when a pooled one
turns out to be dead. It refuses to own time to first byte, idle and total deadlines
(``router.proxy.forward`` enforces them by cancelling the awaiting task), retries across
replicas, redirects, cookies and compression (it asks for identity: bytes are relayed raw).

Why: aiohttp's general-purpose machinery (request/response objects, tracing hooks, timers,
StreamReader) costs about twice the CPU of this path per proxied request; the figures are
at ``ProxyConfig.client``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools

from router.config import ProxyConfig, TimeoutsConfig
from router.proxy.client import ConnectFailed, StreamBroken, UpstreamFailure

HIGH_WATER = 256 * 1024
"""Unconsumed body bytes at which the socket stops being read: a slow SSE client holds at most
this much (plus the kernel's socket buffers) in the router, and the engine feels the pushback.
Large enough that a non-streaming answer, drained as it arrives, never pauses."""

_RESERVED = frozenset({"host", "content-length", "transfer-encoding", "connection", "accept-encoding"})
"""Framing headers this module writes itself; a caller's copy would make the request ambiguous."""


class _Stale(UpstreamFailure):
    """A pooled connection died before any byte of the answer: the server had closed it while idle."""


class _Unsolicited(Exception):
    """Response bytes arrived when no request was waiting for them."""


class _Conn(asyncio.Protocol):
    """One socket: the parser's callbacks feed the response in flight, if any."""

    def __init__(self, client: H1Upstream, pool: _Pool) -> None:
        self.client = client
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: _H1Response | None = None
        self.reused = False
        self.got_bytes = False
        self.paused = False
        self.closed = False
        self.counted = True  # holds one of the client's max_connections slots until forgotten
        self.idle_since = 0.0

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(StreamBroken("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self.fail(StreamBroken(f"malformed answer from the upstream: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client._forget(self)
        resp, self.resp = self.resp, None
        if resp is None:
            return
        if resp.head_done and not resp.framed:
            resp.finish()  # neither content-length nor chunked: the body ends where the connection does
        elif self.reused and not self.got_bytes:
            resp.fail(_Stale("pooled connection closed by the upstream"))
        else:
            resp.fail(StreamBroken(f"upstream closed the connection: {exc or 'EOF'}"))

    # -- httptools callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.resp is None:
            raise _Unsolicited  # e.g. an idle connection's "408 Request Timeout": the connection is unusable

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = cast(_H1Response, self.resp)
        resp.headers.append((name, value))
        if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
            resp.framed = True

    def on_headers_complete(self) -> None:
        resp = cast(_H1Response, self.resp)
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: interim, the real answer follows
            resp.headers, resp.framed, resp.interim = [], False, True
            return
        resp.status = status
        resp.head_done = True
        resp.wake()

    def on_body(self, body: bytes) -> None:
        resp = cast(_H1Response, self.resp)
        resp.parts.append(body)
        resp.size += len(body)
        if resp.size > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        resp.wake()

    def on_message_complete(self) -> None:
        resp = cast(_H1Response, self.resp)
        if resp.interim:
            resp.interim = False
            return
        self.resp = None
        resp.finish()
        self.client._release(self)

    # -- used by the client and the response ------------------------------------------------------
    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def fail(self, exc: UpstreamFailure) -> None:
        resp, self.resp = self.resp, None
        self.close()
        if resp is not None:
            resp.fail(exc)

    def close(self) -> None:
        """Drop the socket (an unfinished answer: the engine sees the disconnect and aborts)."""
        self.resp = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        self.client._forget(self)


class _H1Response:
    """One answer: status and headers once in, then body bytes buffered until pulled."""

    __slots__ = ("_conn", "_waiter", "done", "error", "framed", "head_done", "headers", "interim", "parts",
                 "size", "status")

    def __init__(self, conn: _Conn) -> None:
        self._conn: _Conn | None = conn
        self._waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.parts: list[bytes] = []
        self.size = 0
        self.head_done = self.framed = self.interim = self.done = False
        self.error: UpstreamFailure | None = None

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def finish(self) -> None:
        self.done = True
        self._conn = None
        self.wake()

    def fail(self, exc: UpstreamFailure) -> None:
        self.error = exc
        self._conn = None
        self.wake()

    async def wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _take(self) -> bytes:
        parts = self.parts
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        self.size = 0
        if self._conn is not None and self._conn.paused:
            self._conn.resume()
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            if self.parts:
                yield self._take()  # bytes that arrived before a break are delivered before the error
            elif self.done:
                return
            elif self.error is not None:
                raise self.error
            else:
                await self.wait()

    async def read(self) -> bytes:
        out: list[bytes] = []
        while True:
            if self.parts:
                out.append(self._take())  # drained as it arrives, so a large answer never pauses reading
            if self.done:
                return out[0] if len(out) == 1 else b"".join(out)
            if self.error is not None:
                raise self.error
            await self.wait()

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:  # unfinished: the socket cannot carry another request
            conn.close()
        self.parts.clear()
        self.done = True


class _Pool:
    """Idle keep-alive connections to one (scheme, host, port), most recently used last."""

    __slots__ = ("host", "idle", "port", "ssl")

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        self.host, self.port, self.ssl = host, port, ssl_context
        self.idle: dict[_Conn, None] = {}  # insertion-ordered: O(1) removal when the server closes one


class H1Upstream:
    """Keep-alive HTTP/1.1 pools on asyncio.Protocol + httptools, sized like the other clients."""

    def __init__(self, proxy: ProxyConfig, timeouts: TimeoutsConfig) -> None:
        self._max = proxy.max_connections
        self._max_idle = proxy.max_keepalive
        self._expiry = proxy.keepalive_expiry_s
        self._connect_s = timeouts.connect_s
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._targets: dict[str, tuple[_Pool, str]] = {}
        self._conns: set[_Conn] = set()  # every open socket, for aclose
        self._idle = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    async def open(self, url: str, body: bytes, headers: Mapping[str, str]) -> _H1Response:
        target = self._targets.get(url) or self._target(url)
        head = target[1]
        for name, value in headers.items():
            if name.lower() in _RESERVED or "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                raise ValueError(f"header {name!r} cannot be forwarded")
            head += f"{name}: {value}\r\n"
        request = f"{head}content-length: {len(body)}\r\n\r\n".encode("latin-1") + body
        conn = await self._acquire(target[0], fresh=False)
        try:
            return await self._send(conn, request)
        except _Stale:
            # The server closed this pooled connection while it sat idle and not one byte of the
            # answer came back, so the engine never started on it: resending the POST once, on a new
            # connection, cannot run it twice. Any other failure is left to forward.py's retry policy.
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
    def _target(self, url: str) -> tuple[_Pool, str]:
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
            pool = self._pools[key] = _Pool(parts.hostname, port, ctx)
        host = parts.netloc.rpartition("@")[2]
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        target = (pool, f"POST {path} HTTP/1.1\r\nhost: {host}\r\naccept-encoding: identity\r\n")
        if len(self._targets) >= 1024:  # replicas x endpoints; bounded in case backends churn
            self._targets.clear()
        self._targets[url] = target
        return target

    async def _send(self, conn: _Conn, request: bytes) -> _H1Response:
        resp = conn.resp = _H1Response(conn)
        conn.got_bytes = False
        try:
            cast(asyncio.Transport, conn.transport).write(request)
            while not resp.head_done:
                if resp.error is not None:
                    raise resp.error
                await resp.wait()
        except UpstreamFailure:
            conn.close()
            raise
        except (RuntimeError, OSError) as exc:  # writing to a transport that is already closing
            conn.close()
            raise (_Stale if conn.reused else StreamBroken)(type(exc).__name__) from None
        except BaseException:  # cancelled (first-byte deadline, client gone): the request is in flight
            conn.close()
            raise
        return resp

    async def _acquire(self, pool: _Pool, *, fresh: bool) -> _Conn:
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

    async def _connect(self, pool: _Pool, loop: asyncio.AbstractEventLoop) -> _Conn:
        conn = _Conn(self, pool)
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

    def _release(self, conn: _Conn) -> None:
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

    def _forget(self, conn: _Conn) -> None:
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
