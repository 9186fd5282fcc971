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
import hashlib
import time
from collections import deque
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from router.tasks import cancel_and_wait

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
        deadline = time.monotonic() + within_s
        while True:  # skip unsubscribe notices (b"\x00...") of subscribers that went away
            left = deadline - time.monotonic()
            if left <= 0 or not await self.pub.poll(timeout=int(left * 1000)):
                raise TimeoutError("no subscriber connected")
            frames = await self.pub.recv_multipart()
            if frames and frames[0][:1] == b"\x01":
                return

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
        await cancel_and_wait(self._replay_task)
        self.pub.close(linger=0)
        if self.replay is not None:
            self.replay.close(linger=0)


# ---- the benchmark ---------------------------------------------------------------------------

def _publisher_process(n_batches: int, rate: float, blocks: int, block_size: int,
                       endpoint_out: Any, finished: Any) -> None:
    """A separate process, so the router's core is measured alone. Each batch: one BlockStored of
    ``blocks`` blocks continuing a chain, plus a BlockRemoved of the oldest blocks once 8192 are held
    (a cache at steady state). The send time rides in the first two token ids (µs, split in uint32s),
    so the router side can measure event-to-index lag exactly when the index write returns."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind("tcp://127.0.0.1:*")  # a port of its own choosing: no race with other processes for a free one
    endpoint_out.put(pub.getsockopt_string(zmq.LAST_ENDPOINT))
    pub.recv_multipart()  # the router's subscription
    encode = msgspec.msgpack.encode
    held: deque[int] = deque()
    parent: int | None = None

    def batch(seq: int) -> list[bytes]:
        nonlocal parent
        now_us = int(time.time() * 1e6)
        toks = [now_us >> 32, now_us & 0xFFFFFFFF] + [(seq * 7 + i) % 8192 for i in range(blocks * block_size - 2)]
        hashes = [(seq << 8) + i + 1 for i in range(blocks)]
        events: list[Any] = [{"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
                              "token_ids": toks, "block_size": block_size, "lora_id": None, "medium": "GPU",
                              "lora_name": None}]
        parent = None if seq % 16 == 15 else hashes[-1]  # chains of 16 batches, then a new prompt
        held.extend(hashes)
        if len(held) > 8192:
            events.append({"type": "BlockRemoved", "block_hashes": [held.popleft() for _ in range(blocks)],
                           "medium": "GPU"})
        return [b"", seq.to_bytes(8, "big"), encode([time.time(), events, 0])]

    if rate <= 0:  # saturation: encode everything first, so the publisher is never the bottleneck
        for frames in [batch(seq) for seq in range(n_batches)]:
            pub.send_multipart(frames)
    else:
        t0 = time.perf_counter()
        for seq in range(n_batches):
            delay = t0 + seq / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pub.send_multipart(batch(seq))
    finished.wait(120)  # closing earlier would discard what is still queued in ZMQ
    pub.close(linger=0)
    ctx.term()


async def _run(n_batches: int, rate: float, blocks: int, block_size: int) -> dict[str, float]:
    import multiprocessing

    from router import metrics
    from router.config import BackendConfig, RouterConfig
    from router.events.ingest import EventIngest
    from router.fleet.backend import Backend
    from router.index.memory import MemoryBlockIndex
    from router.types import BackendId

    mp = multiprocessing.get_context("spawn")
    endpoint_q, finished = mp.Queue(), mp.Event()
    proc = mp.Process(target=_publisher_process, args=(n_batches, rate, blocks, block_size, endpoint_q, finished),
                      daemon=True)
    proc.start()
    try:
        endpoint = await asyncio.get_running_loop().run_in_executor(None, endpoint_q.get, True, 60)
    except Exception as exc:
        proc.kill()
        raise RuntimeError("the publisher process did not start within 60 s") from exc
    url = "http://127.0.0.1:1"
    config = RouterConfig(block_size=block_size, backends=[BackendConfig(url=url, kv_events=endpoint)])
    backend = Backend(id=BackendId(url), url=url, base_model="sim-model", block_size=block_size)

    class _Fleet:
        def backends(self) -> list[Backend]:
            return [backend]

        def get(self, rid: str) -> Backend | None:
            return backend if rid == url else None

    ingest = EventIngest(config, MemoryBlockIndex(), _Fleet())
    lags: list[float] = []
    marks: dict[str, float] = {}
    before = sum(metrics.KV_EVENTS.labels(url, t)._value.get() for t in ("BlockStored", "BlockRemoved"))
    await ingest.start()
    applier = ingest.applier(BackendId(url))
    assert applier is not None

    def observe(ev: Any, _keys: Any) -> None:
        if ev.parent_block_hash is None or "first" not in marks:
            marks.setdefault("first", time.perf_counter())
            marks.setdefault("cpu0", time.process_time())
        sent_us = (ev.token_ids[0] << 32) | ev.token_ids[1]
        lags.append(time.time() - sent_us / 1e6)
        marks["last"] = time.perf_counter()
        marks["cpu1"] = time.process_time()

    applier.observers.append(observe)
    deadline = time.monotonic() + 120
    # polling a counter another task advances; an Event would cost the hot path a call per batch
    while (applier.state.expected or 0) < n_batches and time.monotonic() < deadline \
            and proc.is_alive():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    finished.set()
    wall = marks.get("last", 0.0) - marks.get("first", 0.0)
    cpu = marks.get("cpu1", 0.0) - marks.get("cpu0", 0.0)
    applied = applier.state.expected or 0
    await ingest.stop()
    proc.join(10)
    events = sum(metrics.KV_EVENTS.labels(url, t)._value.get() for t in ("BlockStored", "BlockRemoved")) - before
    lags.sort()
    return {
        "batches": applied, "events": events, "wall_s": wall, "cpu_s": cpu,
        "events_per_s": events / wall if wall > 0 else 0.0,
        "events_per_cpu_s": events / cpu if cpu > 0 else 0.0,
        "lag_p50_ms": 1000 * lags[len(lags) // 2] if lags else float("nan"),
        "lag_p99_ms": 1000 * lags[int(len(lags) * 0.99)] if lags else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m loadtest.bench_events", description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=20_000, help="batches to publish in the throughput run")
    p.add_argument("--rate", type=float, default=2_000.0, help="batches/s of the lag run (open loop)")
    p.add_argument("--lag-batches", type=int, default=10_000)
    p.add_argument("--blocks-per-event", type=int, default=2)
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    top = asyncio.run(_run(args.batches, 0.0, args.blocks_per_event, args.block_size))
    paced = asyncio.run(_run(args.lag_batches, args.rate, args.blocks_per_event, args.block_size))
    print(f"KV-event ingestion, real ZMQ loopback, in-process index, {args.blocks_per_event} blocks of "
          f"{args.block_size} tokens per BlockStored, a BlockRemoved per batch at steady state")
    print(f"  saturated: {top['batches']:.0f} batches, {top['events']:.0f} events in {top['wall_s']:.2f} s: "
          f"{top['events_per_s']:,.0f} events/s wall, {top['events_per_cpu_s']:,.0f} events per CPU-second "
          f"(one core); lag p50 {top['lag_p50_ms']:.1f} ms, p99 {top['lag_p99_ms']:.1f} ms (queueing)")
    print(f"  paced at {args.rate:,.0f} batches/s: {paced['batches']:.0f} batches; event-to-index lag "
          f"p50 {paced['lag_p50_ms']:.2f} ms, p99 {paced['lag_p99_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
