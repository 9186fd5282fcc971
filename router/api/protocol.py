"""The HTTP/1.1 server protocol: uvicorn's httptools protocol, with an answer's head and its
first body bytes written to the socket together.

uvicorn writes the status line and headers when the app sends ``http.response.start`` and
the body when it sends ``http.response.body``: two ``send`` system calls per answer. On
loopback each one also runs the receiver's side of TCP and wakes it, which costs 15 µs alone
and 35-45 µs of the router's CPU at 32 concurrent requests (measured around
``transport.write`` in ``python -m loadtest.bench.inprocess``): a tenth of a request's cost.
The router sends the head and the body in the same step of the event loop (a streamed
answer: the head and the first chunk), so holding the head until the next write, or until
the end of that loop step whichever comes first, saves one of the two calls and changes
nothing a client can see: the bytes and their order are the same, and a head not followed
by a body at once still leaves in the same loop iteration.

The two OpenAI POST routes skip ASGI altogether on this protocol: ``router.api.hot``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from router.api.hot import HOT_KINDS, HotExchange

_HEAD = b"HTTP/1."
UVICORN_HTTP = "router.api.protocol:CoalescingHttpToolsProtocol"
"""What ``uvicorn.run(http=...)`` is given (an import string: worker processes import it)."""
UVICORN_OPTIONS = {
    "http": UVICORN_HTTP,
    # Nothing reads the client address, so uvicorn's X-Forwarded-For rewriting is a wrapper per
    # request for nothing (and the hot routes are served only when the app is not wrapped);
    # no "server: uvicorn" header either.
    "proxy_headers": False, "server_header": False,
}
"""The server options of ``serve`` (and of the tests' routers): the same protocol path."""


class _HeadWithBody:
    """A transport that holds a written response head until the next write (or the loop's next turn)."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif data.startswith(_HEAD):
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def write_now(self, data: bytes) -> None:
        """Write ``data`` at once (after a held head, if any): for writers that send whole answers."""
        held, self._held = self._held, None
        self._transport.write(held + data if held is not None else data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        # Everything else (flow control, extra info, abort, ...) is the real transport's.
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol over ``_HeadWithBody`` (``uvicorn.run(http=...)``), with
    the router's two hot routes served by ``router.api.hot.HotExchange``."""

    _exchange: HotExchange | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_HeadWithBody(transport, self.loop))  # type: ignore[arg-type]

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        scope = cycle.scope
        kind = HOT_KINDS.get(scope["path"]) if scope["method"] == "POST" else None
        # ``app`` is anything else when uvicorn answers for itself (its concurrency limit).
        pipeline = getattr(app.state, "pipeline", None) if kind and getattr(app, "serves_hot", False) else None
        if pipeline is None:
            super()._start_asgi_task(cycle, app)
            return
        exchange = self._exchange = HotExchange(cycle, pipeline, kind)  # type: ignore[arg-type]
        task = exchange.task = self.loop.create_task(exchange.run())
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def connection_lost(self, exc: Exception | None) -> None:
        exchange = self._exchange
        if exchange is not None and not exchange.cycle.response_complete:
            exchange.client_left()
        super().connection_lost(exc)
