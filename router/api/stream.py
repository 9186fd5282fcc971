"""The answer of a routed request: dispatch, then pass the upstream answer through.

``answer`` is written once, against a ``Sink``: the ASGI one here (any ASGI server; a
response object that Starlette's routes return), and ``router.api.hot``'s, which writes the
bytes to uvicorn's socket itself. Both cancel the serving task when the client disconnects,
while it waits for the first token or mid-stream: that closes the upstream connection (the
engine sees the disconnect and aborts) and releases the replica's in-flight slot.

On the ASGI path a watcher awaits ``http.disconnect`` and cancels the serving task; it
starts once a request has been served for ``WATCH_AFTER_S``: answers faster than that
never pay for it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from starlette.types import Receive, Scope, Send

from router.api.errors import error_parts, internal_error, log_internal
from router.errors import RouterError
from router.pipeline import Pipeline, Routed

_KEEP = frozenset({b"content-type", b"content-encoding"})  # upstream headers the client gets
WATCH_AFTER_S = 0.02
"""A request still being served after this starts watching for the client's disconnect."""

Headers = list[tuple[bytes, bytes]]


class Sink(Protocol):
    """Where an answer goes. ``started``: its head is out (a failure now can only end the
    body); ``closing``: its last bytes are being written (a disconnect now is no loss)."""

    started: bool
    closing: bool

    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        """The complete answer (the sink adds content-length)."""

    async def start(self, status: int, headers: Headers) -> None:
        """The head of a stream; ``chunk``s and one ``end`` follow."""

    async def chunk(self, data: bytes) -> None: ...

    async def end(self) -> None: ...


async def answer(pipeline: Pipeline, r: Routed, sink: Sink) -> None:
    """Dispatch ``r`` and pass its replica's answer to ``sink``."""
    try:
        opened = await pipeline.dispatch(r)
    except RouterError as exc:
        await sink.whole(*error_parts(exc))
        return
    headers = [(k, v) for k, v in opened.headers if k.lower() in _KEEP]
    headers += [
        (b"x-cache-router-backend", opened.backend.encode()),
        (b"x-cache-router-matched-tokens", str(pipeline.predicted(r, opened.backend)).encode()),
        (b"x-request-id", r.request_id.encode()),
    ]
    if opened.response is None:
        try:
            await sink.whole(opened.status, headers, opened.first)
        finally:
            # After the answer is written: reading the usage, the feedback and the metrics
            # are not on the client's latency (and they run even if the client has left).
            pipeline.complete(r, opened)
        return
    headers.append((b"cache-control", b"no-cache"))
    await pipeline.relay(r, opened, lambda: sink.start(opened.status, headers), sink.chunk, sink.end)


class _AsgiSink:
    __slots__ = ("closing", "send", "started")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False
        self.closing = False

    async def whole(self, status: int, headers: Headers, body: bytes) -> None:
        self.started = self.closing = True
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def start(self, status: int, headers: Headers) -> None:
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def chunk(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self) -> None:
        self.closing = True
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})


class ProxyResponse:
    """The ASGI answer of a routed request (what the endpoints return)."""

    __slots__ = ("_left", "pipeline", "routed")

    def __init__(self, pipeline: Pipeline, routed: Routed) -> None:
        self.pipeline = pipeline
        self.routed = routed
        self._left = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        main = asyncio.current_task()
        assert main is not None
        loop = asyncio.get_running_loop()
        sink = _AsgiSink(send)
        watcher: asyncio.Task[None] | None = None

        def watch() -> None:
            nonlocal watcher
            watcher = loop.create_task(self._watch(receive, main, sink), name="client-disconnect-watch")

        # Most answers are done before anyone could notice a disconnect: a timer is ~10x
        # cheaper than a task started and cancelled per request, and a client that leaves
        # is noticed at most WATCH_AFTER_S later.
        timer = loop.call_later(WATCH_AFTER_S, watch)
        try:
            await answer(self.pipeline, self.routed, sink)
        except asyncio.CancelledError:
            if not self._left:
                raise
            main.uncancel()
        except Exception as exc:  # a bug: never let a traceback (or a prompt) reach the client
            if not sink.started:
                await internal_error(exc, scope["path"])(scope, receive, send)
            else:
                log_internal(exc, scope["path"])  # the stream just ends
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.cancel()

    async def _watch(self, receive: Receive, main: asyncio.Task[Any], sink: _AsgiSink) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not sink.closing:
                    self._left = True
                    main.cancel()
                return
