"""KV events of the simulated fleet, read by a subscriber written here from the fact sheet alone.

The subscriber knows only the wire format (three frames; msgpack ``[ts, events, dp_rank]``;
map events tagged "type" or positional arrays; int or bytes hashes) and keeps, per engine,
stored minus removed, cleared on AllBlocksCleared and on a sequence restart. After a long
random run with evictions its picture must equal the engine's own cache exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
import zmq
import zmq.asyncio

from loadtest.engine import SimFleet
from tests.support.servers import free_port

BS = 16
STORED_FIELDS = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
]
REMOVED_FIELDS = ["block_hashes", "medium"]


def as_key(h: Any) -> int:
    """Int hashes as they are; bytes hashes by their last 8 bytes (equal to the int form)."""
    return int.from_bytes(h[-8:], "big") if isinstance(h, bytes) else int(h)


class Picture:
    """One engine's cache as its events describe it: hash -> (parent, token ids)."""

    def __init__(self) -> None:
        self.blocks: dict[int, tuple[int | None, list[int]]] = {}
        self.next_seq = 0
        self.restarts = 0
        self.batches = 0
        self.removed = 0
        self.cleared = 0

    def apply(self, seq: int, payload: bytes) -> None:
        if seq == 0 and self.next_seq > 0:  # the engine restarted: its cache is empty
            self.blocks.clear()
            self.restarts += 1
        elif seq != self.next_seq:
            raise AssertionError(f"sequence gap: expected {self.next_seq}, got {seq}")
        self.next_seq = seq + 1
        self.batches += 1
        batch = msgspec.msgpack.decode(payload)
        events = batch["events"] if isinstance(batch, dict) else batch[1]
        for raw in events:
            if isinstance(raw, dict):
                kind, ev = raw["type"], raw
            else:
                kind = raw[0]
                names = STORED_FIELDS if kind == "BlockStored" else REMOVED_FIELDS
                ev = dict(zip(names, raw[1:], strict=False))
            if kind == "BlockStored":
                assert ev["medium"] == "GPU" and ev["block_size"] == BS
                assert len(ev["token_ids"]) == BS * len(ev["block_hashes"])
                parent = None if ev["parent_block_hash"] is None else as_key(ev["parent_block_hash"])
                assert parent is None or parent in self.blocks, "a block whose parent was never stored"
                for i, h in enumerate(ev["block_hashes"]):
                    self.blocks[as_key(h)] = (parent, list(ev["token_ids"][i * BS : (i + 1) * BS]))
                    parent = as_key(h)
            elif kind == "BlockRemoved":
                for h in ev["block_hashes"]:
                    del self.blocks[as_key(h)]  # KeyError: removed a block never stored
                    self.removed += 1
            elif kind == "AllBlocksCleared":
                self.blocks.clear()
                self.cleared += 1


def engine_picture(fleet: SimFleet, i: int) -> dict[int, tuple[int | None, list[int]]]:
    return {h: (b["parent"], b["token_ids"]) for h, b in fleet.cache(i).items()}


@contextlib.asynccontextmanager
async def subscribed(endpoints: list[str]) -> AsyncIterator[list[Picture]]:
    """One SUB socket and one Picture per engine (bind mode: every engine's topic is "")."""
    ctx = zmq.asyncio.Context()
    pictures = [Picture() for _ in endpoints]
    socks = []
    for endpoint in endpoints:
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(endpoint)
        socks.append(sock)

    async def pump(sock: zmq.asyncio.Socket, picture: Picture) -> None:
        while True:
            _topic, seq, payload = await sock.recv_multipart()
            picture.apply(int.from_bytes(seq, "big"), payload)

    tasks = [asyncio.create_task(pump(s, p), name="test-sub") for s, p in zip(socks, pictures, strict=True)]
    await asyncio.sleep(0.3)  # the slow joiner: let the subscriptions reach the publishers
    try:
        yield pictures
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        for s in socks:
            s.close(0)
        ctx.term()


async def caught_up(fleet: SimFleet, pictures: list[Picture]) -> None:
    for _ in range(200):
        stats = [await fleet.astats(i) for i in range(len(pictures))]
        if all(p.next_seq == s["event_seq"] for p, s in zip(pictures, stats, strict=True)):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("subscriber never caught up with the engines' event sequence")


async def random_traffic(
    fleet: SimFleet, engine: int, n: int, rng: random.Random, http: httpx.AsyncClient
) -> None:
    prefixes = [[rng.randrange(2, 8000) for _ in range(rng.randint(20, 160))] for _ in range(6)]
    gate = asyncio.Semaphore(4)

    async def one() -> None:
        tokens = rng.choice(prefixes) + [rng.randrange(2, 8000) for _ in range(rng.randint(0, 40))]
        body: dict[str, Any] = {"prompt": tokens, "max_tokens": rng.randint(1, 40)}
        body["model"] = rng.choice(["sim-model", "sim-model", "ad1"])
        if rng.random() < 0.3:
            body["cache_salt"] = rng.choice(["a", "b"])
        url = fleet.urls[engine] + "/v1/completions"
        async with gate:
            if rng.random() < 0.2:  # a client that walks away mid-stream: its blocks must be released
                async with http.stream("POST", url, json={**body, "stream": True}) as r:
                    async for _ in r.aiter_lines():
                        break
            else:
                (await http.post(url, json=body)).raise_for_status()

    await asyncio.gather(*(one() for _ in range(n)))


@pytest.mark.parametrize(("positional", "bytes_hashes"), [(False, False), (True, True)])
async def test_subscriber_picture_equals_engine_cache(positional: bool, bytes_hashes: bool) -> None:
    rng = random.Random(11 + positional)
    async with (
        SimFleet(
            2,
            block_size=BS,
            cache_blocks=48,
            max_num_seqs=4,
            loras=("ad1",),
            kv_events="bind",
            kv_positional=positional,
            kv_bytes_hashes=bytes_hashes,
        ) as fleet,
        subscribed([s.kv_events for s in fleet.specs if s.kv_events]) as pictures,
        httpx.AsyncClient(trust_env=False, timeout=10) as http,
    ):
        await asyncio.gather(*(random_traffic(fleet, i, 100, rng, http) for i in range(2)))
        await caught_up(fleet, pictures)
        for i in range(2):
            assert pictures[i].blocks == engine_picture(fleet, i)
            assert len(pictures[i].blocks) > 20  # the run filled the cache ...
            assert pictures[i].removed > 100  # ... and evicted many times over

        # Reset: AllBlocksCleared rides the next step's batch; then more traffic.
        assert (await http.post(fleet.urls[0] + "/reset_prefix_cache")).json()["reset"]
        await asyncio.gather(*(random_traffic(fleet, i, 40, rng, http) for i in range(2)))
        # Restart engine 1: its sequence starts again at 0, its cache is empty.
        await fleet.arestart(1)
        await random_traffic(fleet, 1, 20, rng, http)
        await caught_up(fleet, pictures)
        for i in range(2):
            assert pictures[i].blocks == engine_picture(fleet, i)
        assert [p.restarts for p in pictures] == [0, 1]
        for i in range(2):  # every request, finished or walked away from, let go of its blocks
            assert all(b["ref_cnt"] == 0 for b in (await fleet.acache(i)).values())
            assert (await fleet.astats(i))["kv_cache_usage"] == 0
        assert [p.cleared for p in pictures] == [1, 0]


async def test_replay_socket_returns_buffered_batches_then_end_marker() -> None:
    rng = random.Random(5)
    async with (
        SimFleet(1, block_size=BS, cache_blocks=48, loras=("ad1",), kv_events="bind") as fleet,
        subscribed([fleet[0].kv_events or ""]) as (live,),
        httpx.AsyncClient(trust_env=False, timeout=10) as http,
    ):
        await random_traffic(fleet, 0, 40, rng, http)
        await caught_up(fleet, [live])
        ctx = zmq.asyncio.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(fleet[0].kv_replay or "")
        try:

            async def replay(start: int) -> list[tuple[int, bytes]]:
                await dealer.send_multipart([b"", start.to_bytes(8, "big")])
                out = []
                while True:
                    frames = await asyncio.wait_for(dealer.recv_multipart(), 5)
                    assert frames[0] == b"" and len(frames) in (3, 4)  # with or without the topic frame
                    seq, payload = frames[-2], frames[-1]
                    if seq == b"\xff" * 8:
                        assert payload == b""
                        return out
                    out.append((int.from_bytes(seq, "big"), payload))

            everything = await replay(0)
            assert [s for s, _ in everything] == list(range(live.next_seq))
            rebuilt = Picture()
            for seq, payload in everything:
                rebuilt.apply(seq, payload)
            assert rebuilt.blocks == live.blocks == engine_picture(fleet, 0)
            tail = await replay(live.next_seq - 3)
            assert [s for s, _ in tail] == list(range(live.next_seq - 3, live.next_seq))
            assert await replay(live.next_seq + 10) == []
            await fleet.arestart(0)
            assert await replay(0) == []  # a restarted engine has an empty buffer
        finally:
            dealer.close(0)
            ctx.term()


async def test_engines_connect_to_a_bound_subscriber_with_their_own_topics() -> None:
    port = free_port()
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind(f"tcp://127.0.0.1:{port}")
    pictures: dict[bytes, Picture] = {}

    async def pump() -> None:
        # A bound SUB hands its subscription to a newly connected PUB only while its owner
        # touches the socket (libzmq runs attach commands in the socket's thread), so the
        # subscriber must be receiving before the engines connect.
        while True:
            topic, seq, payload = await sub.recv_multipart()
            pictures.setdefault(topic, Picture()).apply(int.from_bytes(seq, "big"), payload)

    task = asyncio.create_task(pump(), name="test-bound-sub")
    try:
        async with (
            SimFleet(2, block_size=BS, cache_blocks=48, kv_events=f"tcp://127.0.0.1:{port}") as fleet,
            httpx.AsyncClient(trust_env=False, timeout=10) as http,
        ):
            topics = [s.kv_topic.encode() for s in fleet.specs]
            assert topics == [f"kv-{s.port}".encode() for s in fleet.specs]
            assert all(s.kv_connect for s in fleet.specs)
            await asyncio.sleep(0.3)  # the engines' connections come up
            rng = random.Random(9)
            for i in range(2):
                for _ in range(15):
                    tokens = [rng.randrange(2, 8000) for _ in range(rng.randint(17, 120))]
                    r = await http.post(
                        fleet.urls[i] + "/v1/completions", json={"prompt": tokens, "max_tokens": 3}
                    )
                    r.raise_for_status()
            expected = [(await fleet.astats(i))["event_seq"] for i in range(2)]
            for _ in range(250):
                if [pictures.get(t, Picture()).next_seq for t in topics] == expected:
                    break
                await asyncio.sleep(0.02)
            assert [pictures[t].next_seq for t in topics] == expected
            for i, topic in enumerate(topics):
                assert pictures[topic].blocks == engine_picture(fleet, i)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sub.close(0)
        ctx.term()


async def test_a_killed_and_revived_engine_process_starts_its_sequence_again() -> None:
    async with (
        SimFleet(1, block_size=BS, cache_blocks=48, kv_events="bind", mode="process") as fleet,
        subscribed([fleet[0].kv_events or ""]) as (picture,),
        httpx.AsyncClient(trust_env=False, timeout=10) as http,
    ):
        before = fleet.specs
        url = fleet.urls[0] + "/v1/completions"
        for n in (40, 60):
            (await http.post(url, json={"prompt": list(range(n)), "max_tokens": 20})).raise_for_status()
        await caught_up(fleet, [picture])
        assert picture.next_seq > 1 and picture.blocks
        await asyncio.to_thread(fleet.kill)
        with pytest.raises(httpx.ConnectError):
            await http.post(url, json={"prompt": [1, 2, 3]})
        await asyncio.to_thread(fleet.revive)
        assert fleet.specs == before  # same HTTP, event and replay endpoints
        await asyncio.sleep(
            0.3
        )  # ZMQ reconnects the SUB by itself (retry every 100 ms); events before that are lost
        r = await http.post(url, json={"prompt": list(range(40)), "max_tokens": 2})
        assert (
            r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        )  # the new process starts empty
        await caught_up(fleet, [picture])  # the SUB socket reconnected by itself
        assert picture.restarts == 1
        assert picture.blocks == engine_picture(fleet, 0)
