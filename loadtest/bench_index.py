"""Index benchmark: lookup throughput and latency by prompt length, per backend, plus Redis memory per block.

``python -m loadtest.bench_index`` starts its own redis-server (one node, and a 3-master
Cluster) on free loopback ports, fills each index like a busy fleet (``--replicas``
replicas, each with ``--background`` blocks of other prompts; the probed prompt held whole
by one replica and half by another), then measures for prompts of 1k, 8k and 32k tokens:

* p50 / p99 latency of one lookup, sequential (what one request pays);
* lookups per second with ``--concurrency`` lookups in flight (what one router process can do).

Backends: the in-process index, Redis with the Lua lookup and with the plain pipeline,
single node and Cluster. Memory per block comes from ``MEMORY USAGE`` of a replica's
sorted sets (confirmed and TTL'd entries) and from ``used_memory`` growth.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table

from loadtest.redis_servers import LocalCluster, LocalRedis, free_cluster_port
from router.index import keys as K
from router.index.base import BlockIndex
from router.index.memory import MemoryBlockIndex
from router.index.redis import RedisBlockIndex
from router.types import BackendId, BlockKey

BLOCK = 16
SIZES = (1024, 8192, 32768)


@dataclass
class Row:
    backend: str
    tokens: int
    p50_us: float
    p99_us: float
    per_s: float


def chain(seed: int, n: int) -> list[BlockKey]:
    # distinct 64-bit keys per (seed, position), spread over the whole range like xxh3 keys
    return [BlockKey(((seed << 20) + i) * 0x9E3779B97F4A7C15 % 2**64) for i in range(n)]


async def fill(index: BlockIndex, replicas: int, background: int, probe: list[BlockKey]) -> None:
    for r in range(replicas):
        rid = BackendId(f"http://10.0.0.{r}:8000")
        for part in range(0, background, 2048):  # other prompts, in prompt-sized chains
            await index.record(rid, chain(1000 + r * 1000 + part, min(2048, background - part)), ttl_s=None)
    await index.record(BackendId("http://10.0.0.0:8000"), probe, ttl_s=None)
    await index.record(BackendId("http://10.0.0.1:8000"), probe[: len(probe) // 2], ttl_s=600)


async def measure(
    index: BlockIndex, probe: list[BlockKey], *, iters: int, concurrency: int, max_s: float
) -> tuple[float, float, float]:
    expected = await index.lookup(probe)
    assert expected.get(BackendId("http://10.0.0.0:8000")) == len(probe), expected
    lat: list[float] = []
    t_end = time.perf_counter() + max_s
    for _ in range(iters):
        t0 = time.perf_counter()
        await index.lookup(probe)
        lat.append(time.perf_counter() - t0)
        if t0 > t_end:
            break
    lat.sort()
    p50 = lat[len(lat) // 2]
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]

    done = 0
    t_end = time.perf_counter() + max_s

    async def worker() -> None:
        nonlocal done
        while done < iters * 2 and time.perf_counter() < t_end:
            await index.lookup(probe)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return p50 * 1e6, p99 * 1e6, done / (time.perf_counter() - t0)


async def bench_backend(name: str, make: Any, args: argparse.Namespace) -> list[Row]:
    rows = []
    for tokens in SIZES:
        probe = chain(7, tokens // BLOCK)
        index: BlockIndex = make()
        try:
            await fill(index, args.replicas, args.background, probe)
            iters = max(50, args.iters * 1024 // tokens)
            p50, p99, per_s = await measure(
                index, probe, iters=iters, concurrency=args.concurrency, max_s=args.max_s
            )
            rows.append(Row(name, tokens, p50, p99, per_s))
        finally:
            await index.clear_all()
            await index.close()
    return rows


async def memory_per_block(url: str, blocks: int) -> dict[str, float]:
    """Bytes per (block, replica) entry: MEMORY USAGE of the sorted sets, and used_memory growth."""
    raw = aioredis.Redis.from_url(url)
    ns = "bench-mem"
    index = RedisBlockIndex.from_url(url, namespace=ns, deadline_ms=60_000)
    a, b = BackendId("http://10.0.0.1:8000"), BackendId("http://10.0.0.2:8000")
    try:
        await index.record(a, chain(1, 1), ttl_s=None)
        await index.record(b, chain(1, 1), ttl_s=60)
        base = int((await raw.info("memory"))["used_memory"])
        for part in range(0, blocks, 2048):
            await index.record(a, chain(10 + part, min(2048, blocks - part)), ttl_s=None)
            await index.record(b, chain(10 + part, min(2048, blocks - part)), ttl_s=60)
        grown = int((await raw.info("memory"))["used_memory"]) - base
        lru_a = await raw.memory_usage(K.replica_lru(ns, a), samples=0) or 0
        lru_b = await raw.memory_usage(K.replica_lru(ns, b), samples=0) or 0
        exp_b = await raw.memory_usage(K.replica_exp(ns, b), samples=0) or 0
        return {
            "confirmed": lru_a / (blocks + 1),
            "ttl": (lru_b + exp_b) / (blocks + 1),
            "used_memory": grown / (2 * blocks),
        }
    finally:
        await index.clear_all()
        await index.close()
        await raw.aclose()


@contextlib.contextmanager
def servers(cluster: bool) -> Iterator[tuple[str, str | None]]:
    single = LocalRedis(free_cluster_port()).start()
    many = LocalCluster().start() if cluster else None
    try:
        yield f"redis://127.0.0.1:{single.port}/0", many.url if many else None
    finally:
        single.stop()
        if many:
            many.stop()


async def run(args: argparse.Namespace) -> int:
    console = Console()
    rows: list[Row] = []
    mem: dict[str, float] = {}
    with servers(not args.no_cluster) as (url, cluster_url):
        backends: list[tuple[str, Any]] = [("memory", MemoryBlockIndex)]
        for mode in ("lua", "pipeline"):
            backends.append(
                (
                    f"redis {mode}",
                    lambda m=mode: RedisBlockIndex.from_url(
                        url, namespace=f"bench-{m}", deadline_ms=60_000, lookup_mode=m
                    ),
                )
            )
            if cluster_url:
                backends.append(
                    (
                        f"cluster {mode}",
                        lambda m=mode: RedisBlockIndex.from_url(
                            cluster_url, namespace=f"bench-c{m}", deadline_ms=60_000, lookup_mode=m
                        ),
                    )
                )
        for name, make in backends:
            console.print(f"[dim]{name}...[/dim]")
            rows += await bench_backend(name, make, args)
        mem = await memory_per_block(url, args.mem_blocks)

    table = Table(
        title=f"index lookups: {args.replicas} replicas x {args.background} background blocks, "
        f"block {BLOCK}, concurrency {args.concurrency}"
    )
    for col in ("backend", "prompt tokens", "blocks", "p50 µs", "p99 µs", "lookups/s"):
        table.add_column(col, justify="right" if col != "backend" else "left")
    for r in rows:
        table.add_row(
            r.backend,
            f"{r.tokens}",
            f"{r.tokens // BLOCK}",
            f"{r.p50_us:.0f}",
            f"{r.p99_us:.0f}",
            f"{r.per_s:,.0f}",
        )
    console.print(table)
    load1, _, _ = os.getloadavg()
    console.print(f"machine: {os.cpu_count()} cores, load average {load1:.1f} during the run")
    console.print(
        f"Redis memory per (block, replica) entry over {args.mem_blocks} blocks: "
        f"confirmed {mem['confirmed']:.0f} B, TTL'd {mem['ttl']:.0f} B (MEMORY USAGE); "
        f"used_memory growth {mem['used_memory']:.0f} B"
    )
    by = {(r.backend, r.tokens): r for r in rows}
    for tokens in SIZES:
        lua, pipe = by.get(("redis lua", tokens)), by.get(("redis pipeline", tokens))
        if lua and pipe:
            console.print(
                f"{tokens} tokens: lua/pipeline p50 {lua.p50_us / pipe.p50_us:.2f}x, "
                f"throughput {lua.per_s / pipe.per_s:.2f}x"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_index", description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=8, help="replicas in the index")
    p.add_argument("--background", type=int, default=20000, help="blocks of other prompts per replica")
    p.add_argument(
        "--iters", type=int, default=2000, help="sequential lookups at 1k tokens (fewer for longer)"
    )
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-s", type=float, default=5.0, help="time cap per measurement")
    p.add_argument("--mem-blocks", type=int, default=100_000)
    p.add_argument("--no-cluster", action="store_true")
    args = p.parse_args(argv)
    try:
        import uvloop  # the router runs on uvloop; measure on it too

        return uvloop.run(run(args))
    except ImportError:
        return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
