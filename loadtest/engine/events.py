"""KV-cache events in vLLM's wire format, published over ZMQ, with a replay socket.

Wire format (fact sheet, checked against vLLM 0.32.0):

- every message is three frames: ``topic`` (utf-8), ``seq`` (8-byte big-endian, from 0 per
  engine process), ``payload`` (msgpack);
- payload: array ``[ts, events, data_parallel_rank]``;
- events: msgpack maps tagged ``"type"`` with fields equal to their default left out
  (``positional=True``: the older ``["BlockStored", field, ...]`` arrays);
- block hashes: uint64, the low 8 bytes of the digest (``int_hashes=False``: the digest bytes);
- ``extra_keys``: one entry per block, what the engine hashed into it: ``[lora_name?, salt?]``
  with the LoRA name on every block and the salt on block 0 only, None for plain text;
- replay: a ROUTER the engine binds; a DEALER sends ``[b"", start_seq]`` and gets
  ``[b"", topic, seq, payload]`` per buffered batch, then ``[b"", topic, -1, b""]``.

Socket modes as in vLLM: the PUB socket binds (the subscriber connects) or connects to a
subscriber's bound endpoint, in which case the topic tells engines apart.

It owns encoding and sockets; what the events say comes from ``cache.PrefixCache``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from loadtest.engine.cache import CacheEvent, Cleared, Removed, Stored, as_int, extra_keys
from router.tasks import cancel_and_wait

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
MEDIUM = "GPU"

Hash = int | bytes


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True):
    block_hashes: list[Hash]
    parent_block_hash: Hash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None = None
    extra_keys: list[list[str] | None] | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True):
    block_hashes: list[Hash]
    medium: str | None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True):
    pass


class BlockStoredArray(msgspec.Struct, tag="BlockStored", array_like=True, omit_defaults=True):
    block_hashes: list[Hash]
    parent_block_hash: Hash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None = None
    extra_keys: list[list[str] | None] | None = None


class BlockRemovedArray(msgspec.Struct, tag="BlockRemoved", array_like=True, omit_defaults=True):
    block_hashes: list[Hash]
    medium: str | None


class AllBlocksClearedArray(msgspec.Struct, tag="AllBlocksCleared", array_like=True, omit_defaults=True):
    pass


class EventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None


@dataclass(frozen=True)
class EventsConfig:
    endpoint: str  # "tcp://127.0.0.1:0" binds a free port; "tcp://*:5557" as vLLM's default
    connect: bool = False  # True: connect to a subscriber's bound endpoint (vLLM's rule for tcp://HOST:P)
    replay_endpoint: str | None = None  # always bound
    topic: str = ""
    int_hashes: bool = True  # False: VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0, digests as bytes
    positional: bool = False  # True: older positional-array events
    buffer_steps: int = 10_000  # vLLM's default replay buffer
    hwm: int = 100_000


class Encoder:
    """Cache events -> one msgpack payload."""

    def __init__(self, block_size: int, *, int_hashes: bool = True, positional: bool = False) -> None:
        self.block_size = block_size
        self.int_hashes = int_hashes
        self.positional = positional
        self._msgpack = msgspec.msgpack.Encoder()

    def _hash(self, digest: bytes) -> Hash:
        return as_int(digest) if self.int_hashes else digest

    def event(self, ev: CacheEvent) -> msgspec.Struct:
        if isinstance(ev, Stored):
            # One entry per block, as the engine hashed it: the LoRA name on every block, the
            # salt on block 0 (a run with no parent starts at block 0); None for plain text.
            first = 0 if ev.parent is None else 1
            extra: list[list[str] | None] = []
            for j in range(len(ev.digests)):
                keys = extra_keys(first + j, ev.lora_name, ev.salt)
                extra.append(list(keys) if keys else None)
            stored = BlockStoredArray if self.positional else BlockStored
            return stored(
                block_hashes=[self._hash(d) for d in ev.digests],
                parent_block_hash=None if ev.parent is None else self._hash(ev.parent),
                token_ids=ev.token_ids,
                block_size=self.block_size,
                lora_id=None,
                medium=MEDIUM,
                lora_name=ev.lora_name,
                extra_keys=extra,
            )
        if isinstance(ev, Removed):
            removed = BlockRemovedArray if self.positional else BlockRemoved
            return removed(block_hashes=[self._hash(ev.digest)], medium=MEDIUM)
        assert isinstance(ev, Cleared)
        return AllBlocksClearedArray() if self.positional else AllBlocksCleared()

    def batch(self, events: list[CacheEvent], ts: float | None = None) -> bytes:
        batch = EventBatch(time.time() if ts is None else ts, [self.event(e) for e in events], 0)
        return self._msgpack.encode(batch)


class EventPublisher:
    """One engine's PUB socket, replay buffer and replay ROUTER socket."""

    def __init__(self, config: EventsConfig, block_size: int, ctx: zmq.asyncio.Context) -> None:
        self.config = config
        self.encoder = Encoder(block_size, int_hashes=config.int_hashes, positional=config.positional)
        self._ctx = ctx
        self._topic = config.topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self.seq = 0
        self._pub: zmq.asyncio.Socket | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.endpoint = config.endpoint
        self.replay_endpoint = config.replay_endpoint

    def start(self) -> None:
        pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, self.config.hwm)
        pub.setsockopt(zmq.LINGER, 0)
        if self.config.connect:
            pub.connect(self.config.endpoint)
        else:
            pub.bind(self.config.endpoint)
            self.endpoint = _loopback(pub.getsockopt_string(zmq.LAST_ENDPOINT))
        self._pub = pub
        if self.config.replay_endpoint:
            replay = self._ctx.socket(zmq.ROUTER)
            replay.setsockopt(zmq.LINGER, 0)
            replay.bind(self.config.replay_endpoint)
            self.replay_endpoint = _loopback(replay.getsockopt_string(zmq.LAST_ENDPOINT))
            self._replay = replay
            self._task = asyncio.get_running_loop().create_task(
                self._serve_replay(), name=f"kv-replay {self.replay_endpoint}"
            )

    def publish(self, events: list[CacheEvent]) -> None:
        """Send one batch now; dropped silently if no subscriber is connected (as vLLM does)."""
        if not events or self._pub is None:
            return
        payload = self.encoder.batch(events)
        seq = self.seq
        self.seq += 1
        self._buffer.append((seq, payload))
        with contextlib.suppress(zmq.Again):
            # NOBLOCK on a PUB socket never waits: past the high-water mark ZMQ drops, like vLLM.
            self._pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)

    def restart(self) -> None:
        """A new engine process: the sequence starts again at 0 and the replay buffer is empty."""
        self.seq = 0
        self._buffer.clear()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._replay = None

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        sock = self._replay
        try:
            while True:
                frames = await sock.recv_multipart()
                if len(frames) < 3 or len(frames[-1]) != 8:
                    continue  # not a replay request; vLLM ignores it too
                client, start = frames[0], int.from_bytes(frames[-1], "big")
                for seq, payload in list(self._buffer):
                    if seq >= start:
                        await sock.send_multipart([client, b"", self._topic, seq.to_bytes(8, "big"), payload])
                await sock.send_multipart([client, b"", self._topic, END_SEQ, b""])
        except asyncio.CancelledError:
            log.debug("replay socket %s stopped: engine shutting down", self.replay_endpoint)
            raise
        except zmq.ZMQError as exc:
            log.warning("replay socket %s stopped: %s", self.replay_endpoint, exc)


def _loopback(endpoint: str) -> str:
    """A bound wildcard endpoint as a client on this host connects to it."""
    return endpoint.replace("tcp://0.0.0.0:", "tcp://127.0.0.1:").replace("tcp://[::]:", "tcp://127.0.0.1:")
