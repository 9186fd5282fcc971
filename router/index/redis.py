"""The Redis BlockIndex: one shared truth for every router replica, bounded and fail-open.

Owns the Redis data model (formats in ``router.index.keys``, Lua in ``router/index/lua``),
the per-call deadline and the translation of every Redis failure into
``IndexUnavailable``. It refuses to own metrics, logging of degraded periods and
fallback routing: ``router.index.resilient`` and the gateway do those.

Data model (``router.index.keys``): per replica a hash block -> expiry (what lookups
read), a sorted set block -> recency (its LRU list, what trimming reads), a sorted set of
the TTL'd entries' expiries (what purging reads) and a small meta hash (recency counter,
capacity). A lookup walks each replica's hash with HMGET in a read-only Lua script; a
record adds, refreshes, extends expiries and trims in one atomic script, so two routers
writing the same replica cannot interleave. ``clear`` unlinks the replica's own keys:
proportional to its entries, never a keyspace scan. A chain travels as ONE argument of
8 bytes per key: redis-py packs arguments in Python at several µs each, which cost more
than the whole server-side walk of a 32k-token prompt.

Redis Cluster hash tags: every key of one replica carries one tag, a digest of the
replica id (the ids' own CRC16 clusters near-identical URLs onto one master). The
obvious alternative, tagging by the chain's first block (a whole chain on one node), was
rejected: ``remove`` and event-driven ``record`` calls get bare keys, not their chain's
head, so they could not find the slot; and a record would touch a block's slot and the
replica's slot, losing atomicity. With the replica tag every write is one script on one
node, and a lookup sends one script per replica through a cluster pipeline: one round
trip per node, run in parallel. The hot-spot risk: a node's lookup work follows the
replicas hashed to it, and slots, not load, decide that: with few replicas (say 4 on 3
masters) one node holds twice the share of another, and a replica that holds most hot
prefixes makes its node the busiest. Every lookup visits every node that holds a
replica, so cluster mode buys capacity (memory, writes), not fewer hops.

Lookup variants (``lookup_mode``): ``lua`` (default) runs ``lookup.lua`` server-side,
probes each replica's first block and walks only as far as its run goes, so it sends the
chain once and gets one integer per replica back. ``pipeline`` sends HMGET over the full
chain for every replica and computes runs in Python: also one round trip, but argument
packing, reply size and Python work grow with replicas x prompt length. Measured with
``python -m loadtest.bench_index`` (8 replicas; 2-core box under load), Lua's p50 is
0.45x the pipeline's at 1k tokens and 0.05x at 32k, with 2.4x to 10x the throughput:
Lua is the default.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from importlib import resources
from typing import Any, Literal, TypeVar

from redis.exceptions import NoScriptError

from router.index import keys as K
from router.index.base import IndexUnavailable
from router.index.batch import WriteBatcher
from router.index.connection import FAILURES, connect
from router.types import BackendId, BlockKey

T = TypeVar("T")
LookupMode = Literal["lua", "pipeline"]
REFRESH_S = 0.5
"""How stale the local list of replicas may get before a lookup re-reads it: a replica
first recorded by another router shows up within this, and a lookup re-asks at once when
the list changed, so no entry is missed; larger would hammer the registry's node less."""


WRITE_DEADLINE_S = 0.25
"""Least deadline of a batch of writes (records, removals)."""

CLUSTER_INIT_S = 2.0
"""Bound on discovering a Cluster's slots (a few round trips to each node)."""


def _lua(name: str) -> str:
    return resources.files("router.index").joinpath(f"lua/{name}.lua").read_text()


class RedisBlockIndex:
    name = "redis"

    def __init__(
        self,
        client: Any,
        *,
        namespace: str,
        deadline_ms: float = 5.0,
        cluster: bool = False,
        lookup_mode: LookupMode = "lua",
        clock: Callable[[], float] = time.monotonic,
        slack: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._r = client
        self._slack = slack
        """Extra seconds each deadline allows for this process's own event-loop delay (LoopLag)."""
        self._ns = namespace
        self._deadline = deadline_ms / 1000.0
        self._cluster = cluster
        self.lookup_mode: LookupMode = lookup_mode
        self._clock = clock
        self._replica_src, self._lookup_src = _lua("replica"), _lua("lookup")
        # SHAs computed once (register_script); NOSCRIPT (a restarted Redis) resends the source
        self._replica_sha = client.register_script(self._replica_src).sha
        self._lookup_sha = client.register_script(self._lookup_src).sha
        # scripts believed loaded: the first call of each sends its source (EVAL loads and
        # runs in one round trip), later ones go by SHA
        self._loaded: set[str] = set()
        self._replicas: list[BackendId] | None = None
        self._replicas_at = 0.0
        self._caps: dict[BackendId, int | None] = {}  # re-applied when Redis comes back empty
        self._caps_pending: set[BackendId] = set()
        self._init: asyncio.Task[None] | None = None
        # Writes run in the background (nothing waits on them to answer a client), so they
        # get longer than lookups: a write that misses its deadline is lost routing knowledge.
        self._writes = WriteBatcher(self._flush_writes,
                                    deadline_s=lambda: max(WRITE_DEADLINE_S, self._deadline + slack()))

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str,
        deadline_ms: float = 5.0,
        cluster: bool | None = None,
        lookup_mode: LookupMode = "lua",
        max_connections: int = 256,
        slack: Callable[[], float] = lambda: 0.0,
    ) -> RedisBlockIndex:
        """``redis://host:port/db``; ``redis+cluster://host:port`` (or ``cluster=True``) for a Cluster."""
        client, is_cluster = connect(
            url, deadline_ms=deadline_ms, cluster=cluster, max_connections=max_connections
        )
        return cls(
            client, namespace=namespace, deadline_ms=deadline_ms, cluster=is_cluster, lookup_mode=lookup_mode,
            slack=slack,
        )

    @property
    def client(self) -> Any:
        return self._r

    # --- the contract ---------------------------------------------------------------------

    async def lookup(self, keys: Sequence[BlockKey]) -> Mapping[BackendId, int]:
        if not keys:
            return {}
        # lua: the chain as one argument; pipeline: HMGET needs one argument per key
        chain = K.block_members(keys) if self.lookup_mode == "pipeline" else [K.block_blob(keys)]
        return await self._bounded("lookup", lambda: self._lookup(chain))

    async def record(self, replica: BackendId, keys: Sequence[BlockKey], *, ttl_s: float | None) -> None:
        if not keys:
            return
        ttl_ms = -1 if ttl_s is None else max(1, round(ttl_s * 1000))
        self._know(replica)
        await self._bounded(
            "record", lambda: self._writes.submit(replica, ["record", ttl_ms, K.block_blob(keys)]), write=True
        )

    async def remove(self, replica: BackendId, keys: Sequence[BlockKey]) -> None:
        if keys:
            await self._bounded(
                "remove", lambda: self._writes.submit(replica, ["remove", K.block_blob(keys)]), write=True
            )

    async def clear(self, replica: BackendId) -> int:
        if self._replicas is not None and replica in self._replicas:
            self._replicas.remove(replica)
        return int(await self._bounded("clear", lambda: self._replica_op(replica, "clear")))

    async def clear_all(self) -> None:
        async def run() -> None:
            replicas = await self._read_replicas()
            if replicas:
                await self._pipelined([(r, ["clear"]) for r in replicas])

        await self._bounded("clear", run)

    async def set_capacity(self, replica: BackendId, blocks: int | None) -> None:
        self._know(replica)
        self._caps[replica] = blocks
        # pending until Redis has it: a capacity set while Redis was away goes out with the next write
        self._caps_pending.add(replica)
        await self._bounded("capacity", lambda: self._pipelined([]))

    async def sizes(self) -> Mapping[BackendId, int]:
        async def run() -> dict[BackendId, int]:
            replicas = await self._read_replicas()
            pipe = self._r.pipeline(transaction=False)
            for r in replicas:
                pipe.zcard(K.replica_lru(self._ns, r))
            counts = await pipe.execute() if replicas else []
            return {r: int(c) for r, c in zip(replicas, counts, strict=True) if c}

        return await self._bounded("sizes", run)

    async def purge_expired(self) -> int:
        async def run() -> int:
            replicas = await self._read_replicas()
            if not replicas:
                return 0
            out = await self._pipelined([(r, ["purge"]) for r in replicas])
            empty = [r for r, (_, left) in zip(replicas, out, strict=True) if int(left) == 0]
            # replicas whose entries all expired (a pod long gone): lookups stop probing them; one
            # recorded meanwhile by another router is put back by its next record
            if empty:
                await self._r.srem(K.replicas(self._ns), *empty)
            return sum(int(dropped) for dropped, _ in out)

        return await self._bounded("purge", run)

    async def close(self) -> None:
        await self._writes.close()
        await self._r.aclose()

    # --- internals ------------------------------------------------------------------------

    async def _bounded(self, op: str, fn: Callable[[], Awaitable[T]], *, write: bool = False) -> T:
        """Run one index call under the deadline; every way Redis can fail becomes IndexUnavailable."""
        deadline = self._deadline + self._slack()
        try:
            async with asyncio.timeout(max(WRITE_DEADLINE_S, deadline) if write else deadline):
                if self._cluster and getattr(self._r, "_initialize", False):
                    await self._cluster_ready()
                return await fn()
        except IndexUnavailable:
            raise
        except FAILURES as exc:
            raise IndexUnavailable(f"redis {op} failed: {type(exc).__name__}: {exc}") from exc

    async def _cluster_ready(self) -> None:
        """Discover the cluster's slots once, in a task of its own: it takes tens of ms, more
        than a call's deadline, and cutting it short every time would mean it never finishes."""
        if self._init is None or (self._init.done() and self._init.exception() is not None):

            async def discover() -> None:
                async with asyncio.timeout(CLUSTER_INIT_S):
                    await self._r.initialize()

            self._init = asyncio.get_running_loop().create_task(discover(), name="redis-cluster-init")
            self._init.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.shield(self._init)

    def _know(self, replica: BackendId) -> None:
        if self._replicas is not None and replica not in self._replicas:
            self._replicas.append(replica)

    async def _read_replicas(self) -> list[BackendId]:
        raw = await self._r.smembers(K.replicas(self._ns))
        self._replicas = sorted(BackendId(m.decode()) for m in raw)
        self._replicas_at = self._clock()
        return list(self._replicas)

    async def _lookup(self, members: list[bytes]) -> dict[BackendId, int]:
        """``members``: the lookup's key arguments (8-byte members, or one blob for the Lua script)."""
        if self._replicas is None:
            await self._read_replicas()
        assert self._replicas is not None
        refresh = self._clock() - self._replicas_at > REFRESH_S
        asked = list(self._replicas)
        result, fresh = await self._lookup_round(asked, members, refresh)
        if fresh is not None:
            self._replicas, self._replicas_at = fresh, self._clock()
            missed = [r for r in fresh if r not in asked]
            if missed:  # another router added a replica since we last looked: ask about it now
                more, _ = await self._lookup_round(missed, members, False)
                result.update(more)
        return result

    async def _lookup_round(
        self, replicas: list[BackendId], members: list[bytes], refresh: bool
    ) -> tuple[dict[BackendId, int], list[BackendId] | None]:
        if (not refresh and replicas and self.lookup_mode == "lua" and not self._cluster
                and self._lookup_sha in self._loaded):
            # The common case, one script call: as a plain command, not a one-command
            # pipeline (redis-py's pipeline costs ~20 µs of CPU more per call here).
            helds = [K.replica_held(self._ns, r) for r in replicas]
            try:
                reply = await self._r.execute_command("EVALSHA", self._lookup_sha, len(helds), *helds, *members)
            except NoScriptError:
                self._loaded.clear()
                self._caps_pending.update(self._caps)
                return await self._lookup_round(replicas, members, refresh)
            return {r: int(n) for r, n in zip(replicas, reply, strict=True) if int(n) > 0}, None
        pipe, sent = self._r.pipeline(transaction=False), set[str]()
        if refresh:
            pipe.smembers(K.replicas(self._ns))
        if self.lookup_mode == "pipeline":
            pipe.execute_command("TIME")
            for r in replicas:
                pipe.hmget(K.replica_held(self._ns, r), members)
        elif self._cluster:  # one script per replica, grouped per node by the cluster pipeline
            for r in replicas:
                self._script(
                    pipe, sent, self._lookup_src, self._lookup_sha, 1, K.replica_held(self._ns, r), *members
                )
        elif replicas:
            helds = [K.replica_held(self._ns, r) for r in replicas]
            self._script(pipe, sent, self._lookup_src, self._lookup_sha, len(helds), *helds, *members)
        out = await self._execute(pipe, lambda: self._lookup_round(replicas, members, refresh), sent)
        if isinstance(out, tuple):
            return out
        fresh = sorted(BackendId(m.decode()) for m in out.pop(0)) if refresh else None
        if self.lookup_mode == "pipeline":
            runs = _runs_from_scores(out)
        else:
            runs = [int(x) for reply in out for x in reply]
        return {r: n for r, n in zip(replicas, runs, strict=True) if n > 0}, fresh

    async def _execute(self, pipe: Any, again: Callable[[], Awaitable[T]], sent: set[str]) -> list[Any] | T:
        """Run a pipeline; ``sent``: SHAs of the scripts it carries as source (EVAL)."""
        try:
            out = list(await pipe.execute())
        except NoScriptError:
            # Redis restarted empty (or failed over, or a node is new): redo once with the
            # scripts' source, and put back the capacities it forgot (or it would grow unbounded)
            self._loaded.clear()
            self._caps_pending.update(self._caps)
            return await again()
        self._loaded.update(sent)
        return out

    def _script(self, pipe: Any, sent: set[str], src: str, sha: str, numkeys: int, *args: Any) -> None:
        if sha in self._loaded:
            pipe.execute_command("EVALSHA", sha, numkeys, *args)
        else:
            pipe.execute_command("EVAL", src, numkeys, *args)
            sent.add(sha)

    async def _replica_op(self, replica: BackendId, *args: Any) -> Any:
        return (await self._pipelined([(replica, list(args))]))[0]

    async def _pipelined(self, ops: list[tuple[BackendId, list[Any]]]) -> list[Any]:
        """Replica-script calls in one pipeline (after any pending capacities); their replies in order."""
        caps = [(r, ["cap", _cap_arg(self._caps.get(r))]) for r in sorted(self._caps_pending)]
        todo = caps + ops
        if not todo:
            return []
        # the registry lets lookups and sizes() find replicas without a scan
        new = {r for r, args in todo if args[0] in ("record", "cap")}
        pipe, sent = self._r.pipeline(transaction=False), set[str]()
        for replica, args in todo:
            self._script(
                pipe, sent, self._replica_src, self._replica_sha, 4, *K.replica_keys(self._ns, replica), *args
            )
        if new:
            pipe.sadd(K.replicas(self._ns), *new)
        # a cleared replica leaves the registry (a record by another router puts it back)
        gone = {r for r, args in todo if args[0] == "clear"}
        if gone:
            pipe.srem(K.replicas(self._ns), *gone)
        out = await self._execute(pipe, lambda: self._pipelined(ops), sent)
        if isinstance(out, list) and len(out) >= len(todo):  # this round sent the capacities
            self._caps_pending.difference_update(r for r, _ in caps)
            return out[len(caps) : len(todo)]
        return out

    async def _flush_writes(self, ops: list[tuple[BackendId, list[Any]]]) -> None:
        """One pipeline for every write submitted in the same event-loop turn (group commit)."""
        await self._pipelined(ops)


def _cap_arg(blocks: int | None) -> int:
    return -1 if blocks is None else blocks


def _runs_from_scores(out: list[Any]) -> list[int]:
    """Pipeline variant: [TIME, HMGET of each replica's held hash] -> leading runs."""
    secs, micros = out[0]
    now_ms = int(secs) * 1000 + int(micros) // 1000
    runs = []
    for values in out[1:]:
        run = 0
        for v in values:
            if v is None or (v != b"0" and int(v) <= now_ms):
                break
            run += 1
        runs.append(run)
    return runs
