"""The ASGI answer of a routed request: dispatch, then pass the upstream answer through.

It runs the dispatch itself (not the endpoint), so that a client that disconnects at any
time, while waiting for the first token or mid-stream, cancels the upstream request: a
watcher awaits ``http.disconnect`` and cancels the serving task, which closes the
upstream connection (the engine sees the disconnect and aborts) and releases the
replica's in-flight slot. The watcher starts once a request has been served for
``WATCH_AFTER_S``: answers faster than that never pay for it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import Receive, Scope, Send

from router.api.errors import error_response, internal_error
from router.errors import RouterError
from router.pipeline import Pipeline, Routed

_KEEP = frozenset({b"content-type", b"content-encoding"})  # upstream headers the client gets
WATCH_AFTER_S = 0.02
"""A request still being served after this starts watching for the client's disconnect."""


class ProxyResponse:
    __slots__ = ("_closing", "_left", "_started", "pipeline", "routed")

    def __init__(self, pipeline: Pipeline, routed: Routed) -> None:
        self.pipeline = pipeline
        self.routed = routed
        self._left = False
        self._closing = False
        self._started = False
        """The answer's head was handed to the server: a failure now can only end the body."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        main = asyncio.current_task()
        assert main is not None
        loop = asyncio.get_running_loop()
        watcher: asyncio.Task[None] | None = None

        def watch() -> None:
            nonlocal watcher
            watcher = loop.create_task(self._watch(receive, main), name="client-disconnect-watch")

        # Most answers are done before anyone could notice a disconnect: a timer is ~10x
        # cheaper than a task started and cancelled per request, and a client that leaves
        # is noticed at most WATCH_AFTER_S later.
        timer = loop.call_later(WATCH_AFTER_S, watch)
        try:
            await self._serve(scope, receive, send)
        except asyncio.CancelledError:
            if not self._left:
                raise
            main.uncancel()
        except Exception as exc:  # a bug: never let a traceback (or a prompt) reach the client
            if not self._started:
                await internal_error(exc, scope["path"])(scope, receive, send)
            else:
                internal_error(exc, scope["path"])  # logged; the stream just ends
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.cancel()

    async def _watch(self, receive: Receive, main: asyncio.Task[Any]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self._closing:
                    self._left = True
                    main.cancel()
                return

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        r = self.routed
        try:
            opened = await self.pipeline.dispatch(r)
        except RouterError as exc:
            self._closing = self._started = True
            await error_response(exc)(scope, receive, send)
            return
        headers = [(k, v) for k, v in opened.headers if k.lower() in _KEEP]
        headers += [
            (b"x-cache-router-backend", opened.backend.encode()),
            (b"x-cache-router-matched-tokens", str(self.pipeline.predicted(r, opened.backend)).encode()),
            (b"x-request-id", r.request_id.encode()),
        ]
        if opened.response is None:
            headers.append((b"content-length", str(len(opened.first)).encode()))
            self._closing = self._started = True
            try:
                await send({"type": "http.response.start", "status": opened.status, "headers": headers})
                await send({"type": "http.response.body", "body": opened.first, "more_body": False})
            finally:
                # After the answer is written: reading the usage, the feedback and the metrics
                # are not on the client's latency (and they run even if the client has left).
                self.pipeline.complete(r, opened)
            return
        headers.append((b"cache-control", b"no-cache"))

        async def start() -> None:
            self._started = True
            await send({"type": "http.response.start", "status": opened.status, "headers": headers})

        async def body(chunk: bytes) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        async def end() -> None:
            self._closing = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self.pipeline.relay(r, opened, start, body, end)
