"""A liveness listener on its own thread and port (``health_port``): it answers while the
event loop is saturated.

``GET /health`` on the main port waits its turn on the event loop: under saturation that
is hundreds of milliseconds (docs/overhead.md), enough for a liveness probe to kill a
router that is merely busy. This listener answers from a thread, so it only needs the GIL
for a moment. It stays truthful: a heartbeat task on the event loop stamps the time every
``BEAT_S``; the listener answers 200 while the stamp is younger than ``stall_s`` and 503
once the loop has not run for that long (a blocking call, a deadlock), so a stuck router is
still restarted. Each worker process binds the port with SO_REUSEPORT and reports on its
own loop. It owns no routing state and refuses every other path (404).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import logging
import socket
import threading
import time
from typing import Any

log = logging.getLogger("cache_router.liveness")

BEAT_S = 0.1
"""Heartbeat period: cheap (one timestamp) and far below any stall worth reporting."""
STALL_S = 10.0
"""A loop silent this long is stuck, not busy: the worst saturated loop measured answered
within 1.7 s (32k-token prompts, 2 loaded cores)."""


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/health":
            self._answer(404, b'{"status":"not found"}')
            return
        silent = time.monotonic() - self.server.owner.last_beat
        if silent < self.server.owner.stall_s:
            self._answer(200, b'{"status":"ok"}')
        else:
            self._answer(503, b'{"status":"event loop stalled","silent_s":%.1f}' % silent)

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return  # probes every few seconds are not news


class _Server(http.server.HTTPServer):
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: LivenessListener) -> None:
        self.owner = owner
        super().__init__(address, _Handler, bind_and_activate=False)

    def server_bind(self) -> None:
        # Several worker processes share the port; each answers for its own event loop.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class LivenessListener:
    """``await start()`` inside the running loop; ``await stop()`` at shutdown."""

    def __init__(self, host: str, port: int, *, stall_s: float = STALL_S) -> None:
        self.host, self.port, self.stall_s = host, port, stall_s
        self.last_beat = time.monotonic()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._beat: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.last_beat = time.monotonic()
        self._beat = asyncio.create_task(self._heartbeat(), name="liveness-heartbeat")
        server = _Server((self.host, self.port), self)
        try:
            server.server_bind()
            server.server_activate()
        except OSError:
            server.server_close()
            self._beat.cancel()
            raise
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="liveness-listener", daemon=True)
        self._thread.start()
        log.info("liveness listener on %s:%d", self.host, self.port)

    async def _heartbeat(self) -> None:
        try:
            while True:
                self.last_beat = time.monotonic()
                await asyncio.sleep(BEAT_S)
        except asyncio.CancelledError:
            log.info("liveness heartbeat stopped: shutdown")
            raise

    async def stop(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.shutdown)  # waits up to one poll interval
            server.server_close()
