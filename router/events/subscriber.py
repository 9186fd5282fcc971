"""ZMQ transport for KV events: SUB sockets in both modes, and the replay client.

Owns sockets only: it receives raw frames and hands them, per replica, to a bounded
queue; it never decodes payloads or touches the index (``applier`` does, in order).

Socket modes (vLLM's publisher binds endpoints with ``*``/``::``, else connects):
- connect: the router connects a SUB to each engine's bound PUB (``kv_events`` on the
  backend entry; the per-pod pattern in Kubernetes);
- bind: the router binds ONE SUB (``kv_events_bind``) that many engines connect to, each
  told apart by its topic (``kv_topic`` on the backend entry).

Replay: a DEALER sends ``[b"", start_seq 8-byte BE]`` to the engine's ROUTER and reads
``[b"", topic, seq, payload]`` (``[b"", seq, payload]`` from older vLLM) per buffered batch
until ``seq == -1``. Every wait is bounded: a silent or dead replay socket gives None.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from router.events.decode import END_SEQ, DecodeError, decode_seq

log = logging.getLogger(__name__)

REPLAY_TIMEOUT_S = 2.0
"""Longest wait for each replay reply; vLLM serves replay between publishing steps, so a live
engine answers within milliseconds; 10,000 buffered batches stream in well under a second."""
REPLAY_MAX_BATCHES = 20_000
"""vLLM buffers 10,000 batches by default; twice that bounds a misbehaving peer."""

Frames = list[bytes]
DRAIN_MAX = 256  # messages taken per wake-up before yielding to the other tasks


class ReplayClient:
    """Fetches buffered batches from one engine's replay ROUTER socket."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, *, timeout_s: float = REPLAY_TIMEOUT_S,
                 max_batches: int = REPLAY_MAX_BATCHES) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.max_batches = max_batches

    async def fetch(self, start_seq: int) -> list[tuple[int, bytes]] | None:
        # A fresh DEALER per request: a reply to an earlier, timed-out request can never be
        # mistaken for this one's.
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.endpoint)
            await sock.send_multipart([b"", start_seq.to_bytes(8, "big")])
            out: list[tuple[int, bytes]] = []
            while len(out) <= self.max_batches:
                if not await sock.poll(timeout=int(self.timeout_s * 1000)):
                    log.warning("kv replay: %s did not answer within %.1fs", self.endpoint, self.timeout_s)
                    return None
                frames = await sock.recv_multipart()
                parsed = _replay_frames(frames)
                if parsed is None:
                    log.warning("kv replay: %s sent a malformed reply (%d frames)", self.endpoint, len(frames))
                    return None
                seq, payload = parsed
                if seq == END_SEQ:
                    return out
                out.append((seq, payload))
            log.warning("kv replay: %s sent more than %d batches", self.endpoint, self.max_batches)
            return None
        except zmq.ZMQError as exc:
            log.warning("kv replay: %s failed: %s", self.endpoint, exc)
            return None
        finally:
            sock.close(linger=0)


def _replay_frames(frames: Frames) -> tuple[int, bytes] | None:
    if frames and frames[0] == b"":
        frames = frames[1:]
    if len(frames) == 3:  # topic, seq, payload (vLLM 0.32)
        frames = frames[1:]
    if len(frames) != 2:
        return None
    try:
        return decode_seq(frames[0]), frames[1]
    except DecodeError:
        return None


class EventSocket:
    """One SUB socket (connected to an engine, or bound for many) and its receive loop.

    ``route(topic)`` picks the queue for a message (None: nobody owns that topic; counted
    by the caller's ``on_unrouted``). A full queue: a socket of its own (connect mode) waits,
    which leaves the backlog in ZMQ's receive buffer (RCVHWM) and, past it, to the publisher's
    drop; a shared bound socket drops the message instead, so one slow replica never stalls the
    others. Either way a lost message is a sequence gap the applier repairs by replay.
    """

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, *, bind: bool,
                 route: Callable[[bytes], asyncio.Queue[Any] | None],
                 on_unrouted: Callable[[bytes], None] | None = None, rcvhwm: int = 100_000) -> None:
        self.endpoint = endpoint
        self.bind = bind
        self._route = route
        self._on_unrouted = on_unrouted
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")  # routing is by exact topic below, not zmq's prefix match
        if bind:
            self.sock.bind(endpoint)
        else:
            self.sock.connect(endpoint)
        self.received = 0
        self.dropped = 0

    async def run(self) -> None:
        while True:
            await self._deliver(await self.sock.recv_multipart())
            # Drain what is already queued without a trip through the event loop per message:
            # under a burst this halves the cost of receiving.
            for _ in range(DRAIN_MAX):
                try:
                    # pyzmq's asyncio socket answers NOBLOCK with a Future that is already settled
                    frames: Frames = await self.sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                await self._deliver(frames)

    async def _deliver(self, frames: Frames) -> None:
        self.received += 1
        queue = self._route(frames[0] if frames else b"")
        if queue is None:
            if self._on_unrouted is not None:
                self._on_unrouted(frames[0] if frames else b"")
            return
        if self.bind:
            try:
                queue.put_nowait(frames)
            except asyncio.QueueFull:
                self.dropped += 1
        else:
            await queue.put(frames)

    def close(self) -> None:
        self.sock.close(linger=0)
