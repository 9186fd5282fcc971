"""Worker processes of one ``serve --workers N`` sharing the in-process index, without Redis.

Each worker keeps its own ``MemoryBlockIndex`` (lookups stay dictionary probes, no network).
What the request path writes to it (a routed prompt's keys recorded for its replica, keys
dropped for a replica that did not serve the prompt) is also sent to every sibling as one
message on a Unix socket, and each worker applies what its siblings send. A prefix routed by one worker
is then matched by all of them, as with a shared Redis index.

Everything else every worker learns for itself: KV events (each worker subscribes to every
engine), restarts and removals (each probes the fleet), capacities. Sending those too would
apply them twice, and out of order with the worker's own view.

Also exchanged, every ``LOAD_INTERVAL_S``: each worker's in-flight requests per replica, which
its siblings add to their own (``Backend.shared_in_flight``), so N workers do not all pick the
same "least loaded" replica in the same instant.

Transport: the parent makes a directory (``PEER_DIR_ENV``); each worker listens on a Unix
stream socket ``<dir>/<pid>.sock`` and finds its siblings by listing it (at start and every
``RESCAN_S``, which also notices a restarted worker), one connection per sibling carrying
length-prefixed messages in order. (Datagrams would keep message boundaries for free, but the
kernel queues only ``net.unix.max_dgram_qlen`` of them per socket, 10 by default: a busy
sibling would miss writes at a few thousand requests per second.) Sends never block: a sibling
that has ``MAX_BUFFERED`` bytes unread, or is gone, misses that write (counted in
``cache_router_index_peer_dropped_total``): routing degrades for the prompts it missed, nothing
else. Messages hold hashes and replica ids, never prompt text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import struct
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import cast

from prometheus_client import Counter

from router.fleet.backend import Backend
from router.index.memory import MemoryBlockIndex
from router.tasks import cancel_and_wait
from router.types import BackendId, BlockKey

log = logging.getLogger("cache_router.peers")

PEER_DIR_ENV = "CACHE_ROUTER_PEER_DIR"
RESCAN_S = 1.0
"""How soon a started or restarted sibling receives writes."""
LOAD_INTERVAL_S = 0.1
"""How stale a sibling's in-flight counts may be (they expire after ``LOAD_TTL_S``)."""
LOAD_TTL_S = 1.0
MAX_BUFFERED = 4 << 20
"""Bytes queued for one sibling before its writes are dropped (~30k requests' keys at 2k tokens)."""
MAX_MESSAGE = 64 << 20
"""A longer length prefix is corruption: the connection is closed."""

_RECORD, _REMOVE, _LOAD = 1, 2, 3
_LEN = struct.Struct("<I")  # each message's length, then:
_BODY = struct.Struct("<BdH")  # op, ttl (NaN: none), length of the replica id; then the id, then the keys
_HEAD = struct.Struct("<I" + _BODY.format[1:])
_KEY = "Q"  # BlockKey: an unsigned 64-bit hash

PEER_MESSAGES = Counter("cache_router_index_peer_messages_total",
                        "Index writes exchanged with sibling worker processes", ["direction"])
PEER_DROPPED = Counter("cache_router_index_peer_dropped_total",
                       "Index writes a sibling worker missed (its queue full, or it was gone)")
_sent, _received = PEER_MESSAGES.labels("sent"), PEER_MESSAGES.labels("received")


def _pack(op: int, replica: str, ttl_s: float | None, payload: bytes) -> bytes:
    rid = replica.encode()
    size = _HEAD.size - _LEN.size + len(rid) + len(payload)
    return _HEAD.pack(size, op, math.nan if ttl_s is None else ttl_s, len(rid)) + rid + payload


class Peers:
    """This worker's end of the exchange: ``record``/``remove`` send, ``start`` also receives."""

    def __init__(self, directory: str | Path, local: MemoryBlockIndex,
                 backends: Callable[[], Iterable[Backend]] | None = None, *, name: str | None = None) -> None:
        self.dir = Path(directory)
        self.local = local
        self._backends = backends
        self.name = name or str(os.getpid())
        self.path = self.dir / f"{self.name}.sock"
        self._server: asyncio.AbstractServer | None = None
        self._out: dict[Path, asyncio.Transport] = {}
        self._loads: dict[str, tuple[float, dict[str, int]]] = {}
        """Siblings' in-flight counts by their name (pid): (when received, replica id -> count)."""
        self._task: asyncio.Task[None] | None = None
        self._pending: list[bytes] = []
        self.inbound: set[asyncio.Transport] = set()
        """Siblings' connections to this worker."""

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Inbound(self), str(self.path))
        await self.scan()
        self._task = loop.create_task(self._loop(), name="index-peers")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        if self._server is not None:
            self._server.close()
            self._server = None
        for inbound in list(self.inbound):
            inbound.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        for out in self._out.values():
            out.close()
        self._out.clear()

    @property
    def siblings(self) -> int:
        return len(self._out)

    # --- sending -------------------------------------------------------------------------
    def record(self, replica: BackendId, keys: Sequence[BlockKey], *, ttl_s: float | None) -> None:
        if self._out and keys:
            self._send_keys(_RECORD, replica, ttl_s, keys)

    def remove(self, replica: BackendId, keys: Sequence[BlockKey]) -> None:
        if self._out and keys:
            self._send_keys(_REMOVE, replica, None, keys)

    def _send_keys(self, op: int, replica: BackendId, ttl_s: float | None, keys: Sequence[BlockKey]) -> None:
        try:
            payload = array(_KEY, keys).tobytes()
        except OverflowError:  # not a 64-bit hash: nothing the router's own keys produce
            PEER_DROPPED.inc()
            return
        self._send(_pack(op, replica, ttl_s, payload))

    def _send(self, message: bytes) -> None:
        # Queued and written once per event-loop iteration: the writes of every request that
        # finished in it leave in one system call per sibling, which wakes up once for them.
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(message)

    def _flush(self) -> None:
        data = b"".join(self._pending)
        n = len(self._pending)
        self._pending.clear()
        for path, out in list(self._out.items()):
            if out.is_closing():  # gone: forget it until it reappears
                PEER_DROPPED.inc(n)
                self._forget(path)
            elif out.get_write_buffer_size() > MAX_BUFFERED:  # not reading: it misses these writes
                PEER_DROPPED.inc(n)
            else:
                out.write(data)
                _sent.inc(n)

    def _forget(self, path: Path) -> None:
        out = self._out.pop(path, None)
        if out is not None:
            out.close()
        self._loads.pop(path.stem, None)

    async def scan(self) -> None:
        """Connect to siblings that appeared; drop those whose socket is gone."""
        try:
            present = {p for p in self.dir.glob("*.sock") if p != self.path}
        except OSError:
            return
        for path in set(self._out) - present:
            self._forget(path)
        loop = asyncio.get_running_loop()
        for path in present - set(self._out):
            try:
                out, _ = await loop.create_unix_connection(asyncio.Protocol, str(path))
            except OSError:  # a stale file of a worker that died: nobody listens
                continue
            self._out[path] = out

    async def _loop(self) -> None:
        last_scan = time.monotonic()
        while True:
            await asyncio.sleep(LOAD_INTERVAL_S)
            if time.monotonic() - last_scan >= RESCAN_S:
                await self.scan()
                last_scan = time.monotonic()
            self._exchange_load()

    def _exchange_load(self) -> None:
        if self._backends is None:
            return
        backends = list(self._backends())
        if self._out:
            mine = "\n".join(f"{b.in_flight} {b.id}" for b in backends if b.in_flight > 0)
            self._send(_pack(_LOAD, self.name, None, mine.encode()))
        now = time.monotonic()
        totals: dict[str, int] = {}
        for name, (at, counts) in list(self._loads.items()):
            if now - at > LOAD_TTL_S:
                del self._loads[name]
                continue
            for rid, n in counts.items():
                totals[rid] = totals.get(rid, 0) + n
        for b in backends:
            b.shared_in_flight = totals.get(b.id, 0)

    # --- receiving -----------------------------------------------------------------------
    def apply(self, *messages: bytes | memoryview) -> None:
        """Apply siblings' messages (each without its length prefix) in order; a malformed one is
        ignored. Records for one replica that arrived together are applied as one: a prefix that
        several requests recorded (each with its own tail) is refreshed once, every key ending
        where the last record naming it put it, as if they had been applied one by one."""
        pending: dict[BackendId, tuple[float | None, list[array[int]]]] = {}
        for message in messages:
            parsed = self._parse(message)
            if parsed is None:
                continue
            op, replica, ttl, keys = parsed
            _received.inc()
            group = pending.get(replica)
            if op == _RECORD and group is not None and group[0] == ttl:
                group[1].append(keys)
                continue
            if group is not None:  # a remove, or another TTL: what came before it goes first
                del pending[replica]
                self._record(replica, *group)
            if op == _RECORD:
                pending[replica] = (ttl, [keys])
            elif op == _REMOVE:
                self.local.remove_now(replica, keys)  # type: ignore[arg-type]
        for replica, group in pending.items():
            self._record(replica, *group)

    def _record(self, replica: BackendId, ttl_s: float | None, chains: list[array[int]]) -> None:
        last = chains[-1]
        keys: Sequence[int] = last
        if len(chains) > 1:
            # Each key goes where its last record puts it: walking back from the last chain,
            # an earlier chain adds only the keys no later one has, in its own order, before
            # them. Chains that share a prefix with the last one (the usual case: a system
            # prompt or document, each request with its own tail) skip it in one comparison.
            placed = set(last)
            segments: list[list[int]] = []
            for chain in reversed(chains[:-1]):
                rest = [k for k in chain[_common_prefix(chain, last):] if k not in placed]
                if len(rest) > 1:  # a key twice in one chain: its later place
                    rest = list(dict.fromkeys(reversed(rest)))[::-1]
                placed.update(rest)
                segments.append(rest)
            keys = [k for segment in reversed(segments) for k in segment]
            keys += last
        # Exact: merged chains stand for several records, which a skip of recent keys would reorder.
        self.local.record_now(replica, keys, ttl_s=ttl_s, exact=True)  # type: ignore[arg-type]

    def _parse(self, message: bytes | memoryview) -> tuple[int, BackendId, float | None, array[int]] | None:
        """(op, replica, ttl, keys) of a record or remove; a sibling's load is stored here (None)."""
        try:
            op, ttl, n = _BODY.unpack_from(message)
            start = _BODY.size + n
            replica = BackendId(bytes(message[_BODY.size:start]).decode())
            payload = message[start:]
            if op == _LOAD:
                counts = {}
                for item in bytes(payload).decode().split("\n"):
                    if item:
                        count, _, rid = item.partition(" ")
                        counts[rid] = int(count)
                self._loads[replica] = (time.monotonic(), counts)  # keyed by the sender's name
                return None
            if op not in (_RECORD, _REMOVE):
                raise ValueError(op)
            keys = array(_KEY)
            keys.frombytes(payload)
        except (struct.error, ValueError, UnicodeDecodeError):
            log.warning("ignored a malformed message from a sibling worker")
            return None
        return op, replica, None if math.isnan(ttl) else ttl, keys




def _common_prefix(a: array[int], b: array[int]) -> int:
    """Length of the longest common prefix of two key chains (a C-level comparison per probe)."""
    hi = min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    lo = 0  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    if a[:hi - 1] == b[:hi - 1]:
        return hi - 1
    hi -= 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class _Inbound(asyncio.Protocol):
    """One sibling's connection: length-prefixed messages, applied as they complete."""

    def __init__(self, peers: Peers) -> None:
        self._peers = peers
        self._buf = bytearray()
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._peers.inbound.add(cast(asyncio.Transport, transport))

    def connection_lost(self, exc: Exception | None) -> None:
        self._peers.inbound.discard(cast(asyncio.Transport, self._transport))

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        view = memoryview(buf)
        pos, end = 0, len(buf)
        messages: list[memoryview] = []
        try:
            while end - pos >= _LEN.size:
                (size,) = _LEN.unpack_from(view, pos)
                if size > MAX_MESSAGE:
                    log.warning("closed a sibling worker's connection: a message of %d bytes", size)
                    assert self._transport is not None
                    self._transport.close()
                    pos = end
                    break
                if end - pos - _LEN.size < size:
                    break
                messages.append(view[pos + _LEN.size:pos + _LEN.size + size])
                pos += _LEN.size + size
            self._peers.apply(*messages)
        finally:
            messages.clear()  # the slices, before the buffer they point into changes
            view.release()
        del buf[:pos]
