"""The two OpenAI POST routes on uvicorn's connection, without ASGI in between.

Every proxied request takes ``/v1/completions`` or ``/v1/chat/completions``. Through ASGI,
uvicorn hands the app a scope, a ``receive`` and a ``send`` whose messages it re-validates;
the app then needs a timer per request to notice a client that leaves (ASGI tells only a
task that awaits ``receive``), and its answer's head and body are two writes. For these
two routes the server protocol (``router.api.protocol``) starts a ``HotExchange`` instead:
the body is read from uvicorn's request cycle, the answer's head and body leave in one
write, and a lost connection cancels the exchange's task directly. That took about 40 µs of
CPU off a 2k-token completion (docs/overhead.md, ninth pass). Routing and the answer's
logic are the ASGI path's own (``router.api.openai.route_body``, ``router.api.stream.answer``).

uvicorn keeps everything else: parsing, keep-alive, pipelining, flow control, 100-continue,
graceful shutdown, every other route. The exchange only uses the request cycle's state
(``body``, ``more_body``, ``message_event``, ``disconnected``, ``keep_alive``, ...) as
uvicorn's own ``receive`` and ``send`` do, and finishes it as ``send`` does.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

from router.api.body import check_declared, too_large
from router.api.errors import error_parts, log_internal
from router.api.openai import route_body
from router.api.stream import Headers, answer
from router.errors import RouterError
from router.pipeline import Pipeline
from router.request.model import Kind

log = logging.getLogger("cache_router.api")

HOT_KINDS: dict[str, Kind] = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # what uvicorn's send refuses in a value
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Left(Exception):
    """The client closed the connection before its body was in."""


class HotExchange:
    """One request to a hot route: its body in, routed, its answer out (``stream.Sink``)."""

    __slots__ = ("closing", "cycle", "kind", "left", "pipeline", "started", "task", "transport")

    def __init__(self, cycle: RequestResponseCycle, pipeline: Pipeline, kind: Kind) -> None:
        self.cycle = cycle
        self.pipeline = pipeline
        self.kind = kind
        self.transport: Any = cycle.transport
        """``router.api.protocol``'s: ``write`` holds a head until the next write or the loop's
        next turn (a stream's head leaves with its first chunk); ``write_now`` holds nothing."""
        self.task: asyncio.Task[None] | None = None
        self.started = False
        self.closing = False
        self.left = False

    def client_left(self) -> None:
        """The connection is gone: stop serving unless the last bytes are already out."""
        if not self.closing and self.task is not None and not self.task.done():
            self.left = True
            self.task.cancel()

    async def run(self) -> None:
        cycle = self.cycle
        try:
            headers = _headers(cycle.scope["headers"])
            pipeline = self.pipeline
            try:
                tenant = pipeline.tenancy.identify(headers)  # before reading a body nobody may send
                raw = await self._body(headers)
                routed = await route_body(pipeline, self.kind, headers, tenant, raw)
            except RouterError as exc:
                await self.whole(*error_parts(exc))
                return
            if self.left:
                # The client left while this was being routed, and the cancel did not end it: a
                # library awaited on the way consumed the CancelledError (seen with the Redis index
                # under load: the task went on with its cancel pending, dispatched, and waited out
                # the first-byte window). Never send a request nobody will read.
                raise asyncio.CancelledError
            await answer(pipeline, routed, self)
        except asyncio.CancelledError:
            if not self.left:
                raise
            self.task.uncancel()  # type: ignore[union-attr]  # the client left: nobody to answer
        except _Left:
            pass
        except Exception as exc:  # a bug: never let a traceback (or a prompt) reach the client
            error = log_internal(exc, cycle.scope["path"])
            if not self.started:
                await self.whole(*error_parts(error))
            elif not cycle.response_complete:
                cycle.transport.close()  # the stream just ends

    async def _body(self, headers: dict[str, str]) -> bytes:
        cycle = self.cycle
        limit = self.pipeline.config.max_body_bytes
        check_declared(headers, limit)
        if cycle.waiting_for_100_continue and cycle.more_body and not cycle.transport.is_closing():
            self.transport.write_now(_CONTINUE)
        cycle.waiting_for_100_continue = False
        # uvicorn's parser appends to cycle.body and sets the event; reading stops past 64 KiB
        # until resumed. A chunked or lying client is cut off as soon as it passes the limit.
        while cycle.more_body:
            if len(cycle.body) > limit:
                raise too_large(limit)
            if cycle.disconnected:
                raise _Left
            cycle.flow.resume_reading()
            await cycle.message_event.wait()
            cycle.message_event.clear()
        if cycle.disconnected:
            raise _Left
        if len(cycle.body) > limit:
            raise too_large(limit)
        body = bytes(cycle.body)
        cycle.body = bytearray()
        return body

    # -- the answer (router.api.stream.Sink) -------------------------------------------------
    def _head(self, status: int, headers: Headers, framing: bytes) -> bytes:
        cycle = self.cycle
        parts = [STATUS_LINE.get(status) or b"HTTP/1.1 %d \r\n" % status]
        for name, value in (*cycle.default_headers, *headers):
            if _BAD_VALUE.search(value):
                raise ValueError(f"invalid value in response header {name!r}")
            parts += (name, b": ", value, b"\r\n")
        if not cycle.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (framing, b"\r\n")
        head = b"".join(parts)
        cycle.response_started = True
        return head

    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        head = self._head(status, headers, b"content-length: %d\r\n" % len(body))
        self.started = self.closing = True
        if not self.cycle.disconnected:
            self.transport.write_now(head + body)
            self._complete()

    async def start(self, status: int, headers: Headers) -> None:
        head = self._head(status, headers, b"transfer-encoding: chunked\r\n")
        self.started = True
        if not self.cycle.disconnected:
            self.transport.write(head)

    async def chunk(self, data: bytes) -> None:
        cycle = self.cycle
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()  # the client reads slower than the replica writes
        if not cycle.disconnected and data:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    async def end(self) -> None:
        self.closing = True
        if not self.cycle.disconnected:
            self.transport.write(b"0\r\n\r\n")
            self._complete()

    def _complete(self) -> None:
        """What uvicorn's ``send`` does after a response's last byte."""
        cycle = self.cycle
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()


def _headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """uvicorn's header list (names already lower-case) as a dict; the first of repeated names
    wins, as in Starlette's ``Headers.get``."""
    out: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1")
        if key not in out:
            out[key] = value.decode("latin-1")
    return out
