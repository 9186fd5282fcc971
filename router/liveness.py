"""A liveness listener on its own port (``health_port``), served by a small helper process:
it answers while the event loop is saturated.

``GET /health`` on the main port waits its turn on the event loop: under saturation that
is hundreds of milliseconds (docs/overhead.md), enough for a liveness probe to kill a
router that is merely busy. This listener answers from a helper process (``python -m
router.liveness``, standard library only): it needs neither the router's GIL nor its turn on a busy core's run queue (a thread
in the router measured 40-216 ms p99 for that reason). It stays truthful: a heartbeat task
on the event loop stamps the time every ``BEAT_S``; the listener answers 200 while the stamp
is younger than ``stall_s`` and 503 once the loop has not run for that long (a blocking
call, a deadlock), so a stuck router is still restarted. The heartbeat is a double in a shared memory-mapped file; the helper
exits when the router stops it or dies. Each worker binds the port with SO_REUSEPORT and its helper reports
on its own loop. It owns no routing state and refuses every other path (404). It lives
outside ``router.api`` so that the helper imports nothing but the standard library.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import logging
import mmap
import os
import signal
import socket
import struct
import sys
import tempfile
import time
from typing import Any

from router.tasks import cancel_and_wait

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
        silent = time.monotonic() - self.server.last_beat()
        if silent < self.server.stall_s:
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
    def __init__(self, sock: socket.socket, beat: mmap.mmap, stall_s: float, parent: int) -> None:
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.beat, self.stall_s, self.parent = beat, stall_s, parent

    def last_beat(self) -> float:
        return float(struct.unpack_from("d", self.beat, 0)[0])

    def service_actions(self) -> None:
        if os.getppid() != self.parent:  # the router died without stopping us: never outlive it
            os._exit(0)


def _helper(argv: list[str]) -> int:
    """The helper process: answer probes until terminated or orphaned."""
    ap = argparse.ArgumentParser(prog="python -m router.liveness")
    ap.add_argument("--fd", type=int, required=True, help="listening socket inherited from the router")
    ap.add_argument("--beat", required=True, help="8-byte file the router stamps with time.monotonic()")
    ap.add_argument("--stall", type=float, required=True)
    ap.add_argument("--parent", type=int, required=True)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the router, which stops us
    with open(args.beat, "rb") as f:
        beat = mmap.mmap(f.fileno(), 8, access=mmap.ACCESS_READ)
    _Server(socket.socket(fileno=args.fd), beat, args.stall, args.parent).serve_forever(poll_interval=0.2)
    return 0


class LivenessListener:
    """``await start()`` inside the running loop; ``await stop()`` at shutdown."""

    def __init__(self, host: str, port: int, *, stall_s: float = STALL_S) -> None:
        self.host, self.port, self.stall_s = host, port, stall_s
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._beat: mmap.mmap | None = None
        self._beat_path: str | None = None

    def _stamp(self) -> None:
        if self._beat is not None:
            struct.pack_into("d", self._beat, 0, time.monotonic())

    async def start(self) -> None:
        fd, self._beat_path = tempfile.mkstemp(prefix="cache-router-beat-")
        with os.fdopen(fd, "wb+") as f:
            f.write(b"\0" * 8)
            f.flush()
            self._beat = mmap.mmap(f.fileno(), 8)
        self._stamp()
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Several worker processes share the port; each helper answers for its own worker.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.host, self.port))
            sock.listen(64)
            self.port = sock.getsockname()[1]
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "router.liveness", "--fd", str(sock.fileno()), "--beat", self._beat_path,
                "--stall", str(self.stall_s), "--parent", str(os.getpid()),
                pass_fds=(sock.fileno(),), stdin=asyncio.subprocess.DEVNULL)
        finally:
            sock.close()  # the helper holds its own copy
        self._task = asyncio.create_task(self._heartbeat(), name="liveness-heartbeat")
        log.info("liveness listener on %s:%d (pid %d)", self.host, self.port, self._proc.pid)

    async def _heartbeat(self) -> None:
        try:
            while True:
                self._stamp()
                await asyncio.sleep(BEAT_S)
        except asyncio.CancelledError:
            log.info("liveness heartbeat stopped: shutdown")
            raise

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self._proc is not None:
            proc, self._proc = self._proc, None
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._beat is not None:
            self._beat.close()
            self._beat = None
        if self._beat_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._beat_path)
            self._beat_path = None


if __name__ == "__main__":
    sys.exit(_helper(sys.argv[1:]))
