"""KV-event ingestion benchmark, and the spec-faithful publisher it (and the events tests) drive.

``python -m loadtest.bench_events [--events N] [--blocks-per-event B] [--block-size S]``
publishes vLLM-format batches over real ZMQ loopback into a real ``EventIngest`` (in-process
index) and prints events ingested per second of one core and the event-to-index lag
(p50/p99: from the publisher's batch timestamp to the moment the index answers for it).

``SpecPublisher`` is written from ../shared/specs/vllm-engine.md, independently of the
router's decoder: three frames ``[topic, seq, payload]``, payload ``[ts, events, dp_rank]``,
map-tagged or positional events, int or bytes hashes, a replay ROUTER. It uses XPUB so a
caller can wait for the subscriber to be connected (XPUB is PUB on the wire).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import deque
from typing import Any

import msgspec
import zmq
import zmq.asyncio

END_SEQ = b"\xff" * 8


class SpecPublisher:
    """One simulated engine's KV-event PUB socket, replay buffer and replay socket."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, *, bind: bool = True, topic: str = "",
                 replay_endpoint: str | None = None, positional: bool = False, int_hashes: bool = True,
                 replay_topic_frame: bool = True, block_size: int = 16) -> None:
        self.ctx = ctx
        self.topic = topic.encode()
        self.positional = positional
        self.int_hashes = int_hashes
        self.replay_topic_frame = replay_topic_frame
        self.block_size = block_size
        self.seq = 0
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=10_000)
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 1_000_000)
        if bind:
            self.pub.bind(endpoint)
        else:
            self.pub.connect(endpoint)
        self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay: zmq.asyncio.Socket | None = None
        self.replay_endpoint: str | None = None
        self._replay_task: asyncio.Task[None] | None = None
        if replay_endpoint is not None:
            self.replay = ctx.socket(zmq.ROUTER)
            self.replay.setsockopt(zmq.LINGER, 0)
            self.replay.bind(replay_endpoint)
            self.replay_endpoint = self.replay.getsockopt_string(zmq.LAST_ENDPOINT)
            self._replay_task = asyncio.create_task(self._serve_replay(), name="spec-publisher-replay")

    async def wait_subscribed(self, within_s: float = 5.0) -> None:
        """Wait for a subscriber (XPUB delivers its subscription): avoids ZMQ's slow-joiner loss."""
        if not await self.pub.poll(int(within_s * 1000), zmq.POLLIN):
            raise TimeoutError("no subscriber connected")
        await self.pub.recv_multipart()

    # ---- events -----------------------------------------------------------------------------

    def block_hash(self, *material: Any) -> int | bytes:
        digest = hashlib.sha256(repr(material).encode()).digest()
        return int.from_bytes(digest[-8:], "big") if self.int_hashes else digest

    def stored(self, hashes: list[Any], parent: Any, token_ids: list[int], *, block_size: int | None = None,
               medium: str | None = "GPU", lora_name: str | None = None, salt: str | None = None) -> Any:
        bs = block_size or self.block_size
        extra = None if salt is None else [[salt]] + [None] * (len(hashes) - 1)
        if self.positional:
            return ["BlockStored", hashes, parent, token_ids, bs, None, medium, lora_name, extra]
        ev: dict[str, Any] = {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
                              "token_ids": token_ids, "block_size": bs, "lora_id": None, "medium": medium,
                              "lora_name": lora_name}
        if extra is not None:
            ev["extra_keys"] = extra
        ev["kv_cache_spec_kind"] = "full_attention"  # a later addition the router must ignore
        return ev

    def removed(self, hashes: list[Any], medium: str | None = "GPU") -> Any:
        if self.positional:
            return ["BlockRemoved", hashes, medium]
        return {"type": "BlockRemoved", "block_hashes": hashes, "medium": medium}

    def cleared(self) -> Any:
        return ["AllBlocksCleared"] if self.positional else {"type": "AllBlocksCleared"}

    async def publish(self, events: list[Any], *, lose: bool = False, ts: float | None = None) -> int:
        """Send one batch (``lose``: buffer it for replay but never send it, as a dropped message)."""
        payload = msgspec.msgpack.encode([time.time() if ts is None else ts, events, 0])
        seq = self.seq
        self.seq += 1
        self.buffer.append((seq, payload))
        if not lose:
            await self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    async def send_raw(self, frames: list[bytes]) -> None:
        await self.pub.send_multipart(frames)

    def restart(self) -> None:
        """A new engine process: seq from 0, empty replay buffer."""
        self.seq = 0
        self.buffer.clear()

    async def _serve_replay(self) -> None:
        assert self.replay is not None
        while True:
            ident, _empty, start = await self.replay.recv_multipart()
            first = int.from_bytes(start, "big")
            head = [ident, b""] + ([self.topic] if self.replay_topic_frame else [])
            for seq, payload in list(self.buffer):
                if seq >= first:
                    await self.replay.send_multipart([*head, seq.to_bytes(8, "big"), payload])
            await self.replay.send_multipart([*head, END_SEQ, b""])

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
        self.pub.close(linger=0)
        if self.replay is not None:
            self.replay.close(linger=0)
