"""One upstream HTTP/1.1 socket for ``router.proxy.h1``: the protocol and the answer it feeds.

Owns: the ``asyncio.Protocol`` that feeds httptools' response parser (chunked decoding, 1xx,
204/304, bodies that end when the server closes), the answer in flight with its buffer and
backpressure (reading pauses past ``HIGH_WATER`` unconsumed bytes and resumes when drained),
and how a lost socket ends that answer (finished, stale, or ``StreamBroken``). Pooling,
limits and the stale resend belong to ``router.proxy.h1``, reached through ``Owner``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Protocol, cast

import httptools

from router.proxy.client import StreamBroken, UpstreamFailure

HIGH_WATER = 256 * 1024
"""Unconsumed body bytes at which the socket stops being read: a slow SSE client holds at most
this much (plus the kernel's socket buffers) in the router, and the engine feels the pushback.
Large enough that a non-streaming answer, drained as it arrives, never pauses."""


class Owner(Protocol):
    """The pool side of a connection (``H1Upstream``)."""

    def release(self, conn: Connection) -> None:
        """The answer finished: keep the socket for another request, or close it."""

    def forget(self, conn: Connection) -> None:
        """The socket is closed: it no longer counts against the limits."""


class Stale(UpstreamFailure):
    """A pooled connection died before any byte of the answer: the server had closed it while idle."""


class _Unsolicited(Exception):
    """Response bytes arrived when no request was waiting for them."""


class Connection(asyncio.Protocol):
    """One socket: the parser's callbacks feed the response in flight, if any."""

    def __init__(self, owner: Owner, pool: Pool) -> None:
        self.owner = owner
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: H1Response | None = None
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
            cause = exc.__context__  # what a callback raised (httptools chains it)
            self.fail(cause if isinstance(cause, UpstreamFailure)
                      else StreamBroken(f"malformed answer from the upstream: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.owner.forget(self)
        resp, self.resp = self.resp, None
        if resp is None:
            return
        if resp.head_done and not resp.framed:
            resp.finish()  # neither content-length nor chunked: the body ends where the connection does
        elif self.reused and not self.got_bytes:
            resp.fail(Stale("pooled connection closed by the upstream"))
        else:
            resp.fail(StreamBroken(f"upstream closed the connection: {exc or 'EOF'}"))

    # -- httptools callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.resp is None:
            raise _Unsolicited  # e.g. an idle connection's "408 Request Timeout": the connection is unusable

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = cast(H1Response, self.resp)
        resp.headers.append((name, value))
        if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
            resp.framed = True

    def on_headers_complete(self) -> None:
        resp = cast(H1Response, self.resp)
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints: interim, the real answer follows
            resp.headers, resp.framed, resp.interim = [], False, True
            return
        if status == 408 and self.reused:
            # Some servers say "408 Request Timeout" as they close an idle keep-alive socket; met by
            # our request, it means the request was not read: stale, like a silent close (Go does too).
            raise Stale("pooled connection timed out by the upstream (408)")
        resp.status = status
        resp.head_done = True
        resp.wake()

    def on_body(self, body: bytes) -> None:
        resp = cast(H1Response, self.resp)
        resp.parts.append(body)
        resp.size += len(body)
        if resp.size > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        resp.wake()

    def on_message_complete(self) -> None:
        resp = cast(H1Response, self.resp)
        if resp.interim:
            resp.interim = False
            return
        self.resp = None
        resp.finish()
        self.owner.release(self)

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
        self.owner.forget(self)


class H1Response:
    """One answer: status and headers once in, then body bytes buffered until pulled."""

    __slots__ = ("_conn", "_waiter", "done", "error", "framed", "head_done", "headers", "interim", "parts",
                 "size", "status")

    def __init__(self, conn: Connection) -> None:
        self._conn: Connection | None = conn
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


class Pool:
    """Idle keep-alive connections to one (scheme, host, port), most recently used last."""

    __slots__ = ("host", "idle", "port", "ssl")

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        self.host, self.port, self.ssl = host, port, ssl_context
        self.idle: dict[Connection, None] = {}  # insertion-ordered: O(1) removal when the server closes one
