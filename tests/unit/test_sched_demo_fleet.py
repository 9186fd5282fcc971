"""cache_aware against round_robin and least_load on a model of the demo's fleet, closed loop.

``test_sched_simulation`` drives open-loop Poisson traffic at precise-mode index state.
This one reproduces the setting where ``./scripts/demo`` measured cache_aware's TTFT p99
losing to the plain balancers (docs/results.md), so the scheduler is tuned against it:

- engines as in ``loadtest.engine.timing`` at the demo's flags: 8 slots, a FIFO queue, and
  prefills taking turns on one compute timeline per engine (1 ms + 0.04 ms per uncached
  token); decode 32 tokens of 1 ms + 0.1 ms per running sequence; 1,024 blocks of 16 tokens;
- the router in approximate mode, as the demo runs it: a prompt's blocks are recorded for the
  chosen replica at DISPATCH, so followers of a prefix still being prefilled see it as held
  (and the engine, which admits them after the first one, hits it too); the fleet counts
  each request as prefilling from dispatch to its first token (``Fleet.first_byte``);
- the load generator's closed loop: ``CONCURRENCY`` workers, each sending its next request
  when the previous one finished; multi-turn workers send a conversation's turns in order.

Workloads as ``loadtest.workloads.synthetic`` builds them for the demo (512-token system
prompts, 64-token questions): shared_prefix (8 groups), churn (prefixes beyond what the
caches hold), multi_turn (4 turns, the whole history each time), hot_prefix (80% on one
prefix) and zero_reuse. Simplified: decode steps do not stall behind prefills, and the 16
workers start at the same instant (the demo's start spreads over ~10 ms), so the cold start
sets most p99s here: the model shows where requests queue, not the demo's absolute figures.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from router.config import SchedulingConfig
from router.scheduling import Scheduler
from router.scheduling.model import Candidate, RouteRequest
from router.types import BackendId, BlockKey

BLOCK = 16
SLOTS = 8
CACHE_BLOCKS = 1024
PREFILL_BASE_S = 0.001
PREFILL_S_PER_TOKEN = 0.00004
DECODE_S = 0.005
DECODE_S_PER_SEQ = 0.0001
OUTPUT_TOKENS = 32
CONCURRENCY = 16
RAMP_S = 0.25
SYSTEM_BLOCKS = 32  # 512 tokens
QUESTION_BLOCKS = 4  # 64 tokens
REPLY_BLOCKS = 2  # 32 tokens, carried into the next turn


@dataclass
class Req:
    keys: tuple[int, ...]
    tokens: int
    sent: float = 0.0
    ttft: float = 0.0
    cached: int = 0
    predicted: int = 0
    """Uncached tokens the router predicted at dispatch: prefill work until the first token."""


@dataclass
class Engine:
    id: BackendId
    cache: OrderedDict[int, None] = field(default_factory=OrderedDict)
    index: OrderedDict[int, None] = field(default_factory=OrderedDict)
    """The router's approximate index for this engine: keys recorded at dispatch, LRU."""
    waiting: list[tuple[Req, list[tuple[int, ...]]]] = field(default_factory=list)
    running: int = 0
    in_flight: int = 0
    prefilling: int = 0
    prefill_tokens: int = 0
    prefill_started: float = 0.0
    busy_until: float = 0.0

    @staticmethod
    def matched(store: OrderedDict[int, None], keys: tuple[int, ...]) -> int:
        n = 0
        for k in keys:
            if k not in store:
                break
            n += 1
        return n

    def record(self, keys: tuple[int, ...]) -> None:
        for k in keys:
            self.index[k] = None
            self.index.move_to_end(k)
        while len(self.index) > CACHE_BLOCKS:
            self.index.popitem(last=False)

    def start(self, r: Req, now: float, jitter: float) -> tuple[float, float]:
        """Admit and prefill ``r``; returns (first token time, finish time)."""
        hit = min(self.matched(self.cache, r.keys), (r.tokens - 1) // BLOCK)
        for k in r.keys:
            self.cache[k] = None
            self.cache.move_to_end(k)
        while len(self.cache) > CACHE_BLOCKS:
            self.cache.popitem(last=False)
        r.cached = hit * BLOCK
        begin = max(now, self.busy_until)
        self.busy_until = begin + PREFILL_BASE_S + (r.tokens - r.cached) * PREFILL_S_PER_TOKEN
        self.running += 1
        first = self.busy_until
        # ``jitter``: real decode steps vary (and stall behind other prefills); without it a
        # symmetric closed loop keeps each worker on one engine under round robin.
        return first, first + jitter * OUTPUT_TOKENS * (DECODE_S + DECODE_S_PER_SEQ * self.running)


def streams(name: str, seed: int, n: int) -> list[list[tuple[int, ...]]]:
    """The prompts (as block keys) each worker sends in order; ``n`` requests in all."""
    rng = random.Random(seed)

    def fresh(k: int) -> list[int]:
        return [rng.getrandbits(64) for _ in range(k)]

    if name == "multi_turn":
        convs = []
        for _ in range(n // 4):
            history = fresh(SYSTEM_BLOCKS)
            turns = []
            for _ in range(4):
                history = history + fresh(QUESTION_BLOCKS)
                turns.append(tuple(history))
                history = history + fresh(REPLY_BLOCKS)
            convs.append(turns)
        return convs
    if name == "hot_prefix":  # 80% share one system prompt, the rest each have their own
        hot = fresh(SYSTEM_BLOCKS)
        return [[tuple((hot if rng.random() < 0.8 else fresh(SYSTEM_BLOCKS)) + fresh(QUESTION_BLOCKS))]
                for _ in range(n)]
    prefixes = {"shared_prefix": 8, "churn": 250, "zero_reuse": n}[name]
    systems = [fresh(SYSTEM_BLOCKS) for _ in range(prefixes)]
    if name == "shared_prefix":
        order = [i % prefixes for i in range(n)]
        rng.shuffle(order)
    else:
        order = [rng.randrange(prefixes) if name == "churn" else i for i in range(n)]
    return [[tuple(systems[g] + fresh(QUESTION_BLOCKS))] for g in order]


def simulate(policy: str, name: str, seed: int, engines: int, n: int = 400,
             config: SchedulingConfig | None = None, slots_known: bool = True) -> tuple[float, float]:
    """(TTFT p99 in seconds, hit rate) of one closed-loop run; ``slots_known``: the router has
    learned the engines' ``SLOTS`` from their /metrics (``Candidate.slots``)."""
    sched = Scheduler(config or SchedulingConfig(), policy, random.Random(seed))
    fleet = [Engine(BackendId(f"http://sim-{i}")) for i in range(engines)]
    rng = random.Random(seed)
    work: Iterator[list[tuple[int, ...]]] = iter(streams(name, seed, n))
    done: list[Req] = []
    events: list[tuple[float, int, str, int, Req, list[tuple[int, ...]]]] = []
    seq = 0

    def push(t: float, kind: str, where: int, r: Req, rest: list[tuple[int, ...]]) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, where, r, rest))
        seq += 1

    def begin(where: int, r: Req, rest: list[tuple[int, ...]], now: float) -> None:
        first, end = fleet[where].start(r, now, rng.uniform(0.7, 1.3))
        push(first, "first", where, r, rest)
        push(end, "end", where, r, rest)

    def send(rest: list[tuple[int, ...]], now: float) -> None:
        if not rest:
            nxt = next(work, None)
            if nxt is None:
                return
            rest = list(nxt)
        keys = rest.pop(0)
        r = Req(keys=keys, tokens=len(keys) * BLOCK + 5, sent=now)
        cands = [Candidate(id=e.id, matched_blocks=Engine.matched(e.index, keys), in_flight=e.in_flight,
                           prefilling=e.prefilling, prefill_tokens=e.prefill_tokens,
                           prefill_elapsed_ms=(now - e.prefill_started) * 1000 if e.prefilling else 0.0,
                           slots=SLOTS if slots_known else None)
                 for e in fleet]
        route = RouteRequest(model="m", keys=tuple(BlockKey(k) for k in keys), prompt_tokens=r.tokens,
                             block_size=BLOCK, cacheable_blocks=(r.tokens - 1) // BLOCK)
        d = sched.decide(route, cands)
        where = next(j for j, e in enumerate(fleet) if e.id == d.backend)
        e = fleet[where]
        r.predicted = r.tokens - d.matched_tokens
        e.in_flight += 1
        if not e.prefilling:
            e.prefill_started = now
        e.prefilling += 1
        e.prefill_tokens += r.predicted
        e.record(keys)
        if e.running < SLOTS:
            begin(where, r, rest, now)
        else:
            e.waiting.append((r, rest))

    for i in range(CONCURRENCY):  # the demo's clients join one by one (``--ramp``)
        push(i * RAMP_S / CONCURRENCY, "join", 0, Req(keys=(), tokens=0), [])
    while events:
        now, _, kind, where, r, rest = heapq.heappop(events)
        e = fleet[where]
        if kind == "join":
            send([], now)
            continue
        if kind == "first":
            r.ttft = now - r.sent
            e.prefilling -= 1
            e.prefill_tokens -= r.predicted
            if e.prefilling:
                e.prefill_started = now
            continue
        e.running -= 1
        e.in_flight -= 1
        done.append(r)
        if e.waiting:
            begin(where, *e.waiting.pop(0), now)
        send(rest, now)
    ttfts = sorted(r.ttft for r in done)
    p99 = ttfts[int(0.99 * (len(ttfts) - 1))]
    hit = sum(r.cached for r in done) / sum(r.tokens for r in done)
    return p99, hit


def ceiling(name: str, seed: int, n: int = 400) -> float:
    """The hit rate of one unlimited cache on the same prompts (in the order workers start them)."""
    seen: set[int] = set()
    cached = total = 0
    for prompts in streams(name, seed, n):
        for keys in prompts:
            tokens = len(keys) * BLOCK + 5
            hit = 0
            for k in keys:
                if k not in seen:
                    break
                hit += 1
            cached += min(hit, (tokens - 1) // BLOCK) * BLOCK
            total += tokens
            seen.update(keys)
    return cached / total


SEEDS = (1, 2, 3)
POLICIES = ("round_robin", "least_load", "cache_aware")
HOLDS_WORKING_SET = ("shared_prefix", "multi_turn", "hot_prefix")
"""Where the fleet's caches can hold every prefix, so 0.9 x the ceiling is the bar (issue 3)."""


@pytest.mark.parametrize("engines", [4, 8])
@pytest.mark.parametrize("name", ["shared_prefix", "churn", "multi_turn", "hot_prefix", "zero_reuse"])
def test_cache_aware_p99_no_worse_than_the_balancers_on_the_demo_fleet(name: str, engines: int) -> None:
    runs = {p: [simulate(p, name, s, engines) for s in SEEDS] for p in POLICIES}
    p99 = {p: sum(r[0] for r in rs) / len(rs) for p, rs in runs.items()}
    hit = {p: sum(r[1] for r in rs) / len(rs) for p, rs in runs.items()}
    top = sum(ceiling(name, s) for s in SEEDS) / len(SEEDS)
    print(f"\n{name} on {engines} engines, mean of {len(SEEDS)} seeds (ceiling {top:.2f}): " + ", ".join(
        f"{p}: p99 {p99[p] * 1000:.1f} ms hit {hit[p]:.2f}" for p in POLICIES))
    # Deterministic, so only float noise as slack. The count band of before (load_band 2 +
    # 0.25 x min, affinity otherwise) failed churn here: 83 ms against least_load's 74 ms.
    assert p99["cache_aware"] <= min(p99["round_robin"], p99["least_load"]) + 0.0005
    assert hit["cache_aware"] >= max(hit["round_robin"], hit["least_load"]) - 0.01
    if name in HOLDS_WORKING_SET:
        assert hit["cache_aware"] >= 0.9 * top


@pytest.mark.parametrize("name", ["shared_prefix", "churn", "multi_turn", pytest.param("hot_prefix", marks=pytest.mark.xfail(
    strict=True, reason="open: 47.6 ms against least load's 42.9; two cold misses meet on the engine with a free "
                        "slot while the other is full (docs/results.md)")), "zero_reuse"])
def test_on_two_engines_with_more_clients_than_slots_cache_aware_keeps_up_once_it_knows_the_slots(name: str) -> None:
    """16 clients on 2 engines of 8 slots: every slot busy, and a request sent to a full engine
    waits for a whole answer to finish. Affinity alone put a 9th request on a prefix's holder:
    shared prefix 73 ms against least load's 27 here (100 against 31 in the demo). With the
    slots learned from the engines' /metrics, full replicas leave the band while another has
    a free slot; within the demo's 10 % of both balancers (deterministic: no other slack)."""
    runs = {p: [simulate(p, name, s, 2) for s in SEEDS] for p in POLICIES}
    p99 = {p: sum(r[0] for r in rs) / len(rs) for p, rs in runs.items()}
    print(f"\n{name} on 2 engines: " + ", ".join(f"{p} {p99[p] * 1000:.1f} ms" for p in POLICIES))
    assert p99["cache_aware"] <= 1.10 * min(p99["round_robin"], p99["least_load"])
