"""router.index.peers: sibling workers' in-process indexes exchange their request-path writes
over real Unix stream sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from array import array
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.fleet.backend import Backend
from router.index import peers as peers_module
from router.index.memory import MemoryBlockIndex
from router.index.peers import Peers
from router.types import BackendId, BlockKey

R1, R2 = BackendId("http://r1"), BackendId("http://r2")
KEYS = [BlockKey(k) for k in (2**64 - 1, 7, 2**40 + 3, 11)]


async def settle(cond: Callable[[], bool]) -> None:
    """Until ``cond`` holds (2 s at most): the sibling applies what arrives between loop turns."""
    for _ in range(400):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("not settled within 2 s")


@contextlib.asynccontextmanager
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Peers, Peers]]:
    a = Peers(tmp_path, MemoryBlockIndex(), name="a")
    b = Peers(tmp_path, MemoryBlockIndex(), name="b")
    await a.start()
    await b.start()  # b finds a at start; a finds b at its next scan
    await a.scan()
    await settle(lambda: len(a.inbound) == len(b.inbound) == 1)  # both connections accepted
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


async def test_a_record_and_a_remove_reach_the_sibling(tmp_path: Path) -> None:
    async with pair(tmp_path) as (a, b):
        assert a.siblings == b.siblings == 1
        a.local.record_now(R1, KEYS, ttl_s=60)
        a.record(R1, KEYS, ttl_s=60)
        await settle(lambda: b.local.lookup_now(KEYS) == {R1: 4})
        b.record(R2, KEYS[:2], ttl_s=None)  # and back the other way, a confirmed entry
        await settle(lambda: a.local.lookup_now(KEYS) == {R1: 4, R2: 2})
        a.remove(R1, KEYS[2:])
        await settle(lambda: b.local.lookup_now(KEYS) == {R1: 2})


async def test_a_message_larger_than_the_socket_buffers_arrives_whole(tmp_path: Path) -> None:
    keys = [BlockKey(k) for k in range(1, 100_001)]  # 800 KB: written and read in many pieces
    async with pair(tmp_path) as (a, b):
        await b.local.set_capacity(R1, 500)
        a.record(R1, keys, ttl_s=60)
        a.record(R2, keys[:3], ttl_s=60)  # and the next message is framed right after it
        await settle(lambda: b.local.lookup_now(keys[-500:]) == {R1: 500} and b.local.lookup_now(keys) == {R2: 3})


async def test_a_gone_sibling_costs_nothing_and_a_new_one_is_found(tmp_path: Path) -> None:
    async with pair(tmp_path) as (a, b):
        await b.stop()
        await asyncio.sleep(0.05)  # a sees its connection closed
        before = peers_module.PEER_DROPPED._value.get()
        a.record(R1, KEYS, ttl_s=60)  # counted, forgotten, no exception
        await asyncio.sleep(0)  # writes leave once per loop iteration
        assert peers_module.PEER_DROPPED._value.get() == before + 1
        assert a.siblings == 0
        c = Peers(tmp_path, MemoryBlockIndex(), name="c")
        await c.start()
        try:
            await a.scan()
            a.record(R1, KEYS, ttl_s=60)
            await settle(lambda: c.local.lookup_now(KEYS) == {R1: 4})
        finally:
            await c.stop()


async def test_a_stale_socket_file_is_skipped(tmp_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()  # the file stays, nobody listens: a worker killed without cleaning up
    async with pair(tmp_path) as (a, b):
        assert a.siblings == b.siblings == 1


async def test_a_sibling_that_does_not_read_misses_writes_but_nothing_blocks(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers_module, "MAX_BUFFERED", 64 << 10)
    async with pair(tmp_path) as (a, b):
        for inbound in b.inbound:
            inbound.pause_reading()  # b's loop is busy elsewhere
        before = peers_module.PEER_DROPPED._value.get()
        chain = [BlockKey(k) for k in range(1, 257)]
        for i in range(1000):  # 2 KB each: the kernel's buffers and then 64 KB of a's fill up
            a.record(BackendId(f"http://r{i}"), chain, ttl_s=60)
            await asyncio.sleep(0)
        dropped = peers_module.PEER_DROPPED._value.get() - before
        assert 0 < dropped < 1000
        for inbound in b.inbound:
            inbound.resume_reading()
        await settle(lambda: len(b.local._lru) == 1000 - dropped)
        assert all(b.local.lookup_now(chain).get(r) == 256 for r in b.local._lru)


async def test_malformed_messages_are_ignored(tmp_path: Path) -> None:
    async with pair(tmp_path) as (a, b):
        for junk in (b"", b"\x01", b"\x01" + b"\x00" * 8 + b"\xff\xff", b"\x01" + b"\x00" * 10 + b"abc"):
            b.apply(junk)
        a.record(R1, KEYS, ttl_s=60)  # the exchange still works
        await settle(lambda: b.local.lookup_now(KEYS) == {R1: 4})


async def test_in_flight_counts_are_summed_into_shared_in_flight(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers_module, "LOAD_INTERVAL_S", 0.01)
    mine = [Backend(id=R1, url=R1), Backend(id=R2, url=R2)]
    theirs = [Backend(id=R1, url=R1), Backend(id=R2, url=R2)]
    a = Peers(tmp_path, MemoryBlockIndex(), lambda: mine, name="a")
    b = Peers(tmp_path, MemoryBlockIndex(), lambda: theirs, name="b")
    await a.start()
    await b.start()
    await a.scan()
    try:
        theirs[0].in_flight = 3
        await settle(lambda: (mine[0].shared_in_flight, mine[1].shared_in_flight) == (3, 0))
        await b.stop()  # a silent sibling's counts expire
        monkeypatch.setattr(peers_module, "LOAD_TTL_S", 0.05)
        await settle(lambda: mine[0].shared_in_flight == 0)
    finally:
        await a.stop()
        await b.stop()


replica_st = st.sampled_from([R1, R2])
BASE = [BlockKey(k) for k in range(1, 9)]  # a shared prefix, as requests with one system prompt have
chain_st = st.one_of(
    st.lists(st.integers(1, 12).map(BlockKey), min_size=1, max_size=10, unique=True),
    st.tuples(st.integers(0, 8), st.lists(st.integers(9, 14).map(BlockKey), max_size=3, unique=True))
    .map(lambda t: BASE[:t[0]] + t[1]).filter(bool),
)
op_st = st.tuples(st.sampled_from([peers_module._RECORD, peers_module._REMOVE]), replica_st, chain_st,
                  st.sampled_from([None, 30.0, 60.0]))


@settings(max_examples=300, deadline=None)
@given(st.lists(op_st, min_size=1, max_size=12), st.sampled_from([None, 3, 6]))
def test_messages_applied_together_leave_what_one_by_one_leaves(ops: list[tuple[int, BackendId, list[BlockKey],
                                                                              float | None]],
                                                               capacity: int | None) -> None:
    together, one_by_one = MemoryBlockIndex(clock=lambda: 0.0), MemoryBlockIndex(clock=lambda: 0.0)
    for index in (together, one_by_one):
        index._capacity = {R1: capacity, R2: capacity}
        index.record_now(R1, [BlockKey(k) for k in (5, 6, 7)], ttl_s=None)  # something held before
    messages = [peers_module._pack(op, r, ttl, array("Q", keys).tobytes())[peers_module._LEN.size:]
                for op, r, keys, ttl in ops]
    Peers("/nonexistent", together, name="t").apply(*messages)
    single = Peers("/nonexistent", one_by_one, name="s")
    for m in messages:
        single.apply(m)
    # the same keys, in the same recency order; an expiry at least as late (a confirmed entry that
    # one-by-one trimmed and re-recorded with a TTL may stay confirmed when trimmed once at the end)
    assert {r: list(lru) for r, lru in together._lru.items() if lru} == \
        {r: list(lru) for r, lru in one_by_one._lru.items() if lru}
    assert all(exp >= one_by_one._lru[r][k] for r, lru in together._lru.items() for k, exp in lru.items())
    assert {k: set(h) for k, h in together._holders.items()} == {k: set(h) for k, h in one_by_one._holders.items()}


async def test_a_record_that_wrote_nothing_is_not_sent(tmp_path: Path) -> None:
    """The request path (Feedback.record) sends a sibling only what its own index wrote: a hot
    prefix recorded again within the refresh interval costs no message."""
    from router.config import load_config
    from router.feedback import Feedback
    from router.fleet.registry import Fleet
    from router.index.resilient import ResilientIndex

    async with pair(tmp_path) as (a, b):
        config = load_config(None, backends=[{"url": R1}])
        feedback = Feedback(config, ResilientIndex(a.local, metrics=False), Fleet(config), peers=a)
        sent = peers_module._sent._value.get()
        feedback.record(R1, KEYS)
        await settle(lambda: b.local.lookup_now(KEYS) == {R1: 4})
        feedback.record(R1, KEYS)  # moments later: nothing written here, nothing sent
        feedback.record(R1, [*KEYS, BlockKey(99)])  # one new key: written and sent
        await settle(lambda: b.local.lookup_now([*KEYS, BlockKey(99)]) == {R1: 5})
        assert peers_module._sent._value.get() == sent + 2
