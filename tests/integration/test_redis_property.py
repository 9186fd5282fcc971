"""Stateful property test: the Redis index against a plain dict-of-ordered-sets model.

Hypothesis drives random sequences of record / remove / clear / set_capacity against a
real redis-server and after every step compares lookups and sizes with the model. Keys
come from a small pool (so chains overlap and collide) spanning the full 64-bit range.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from router.index.redis import RedisBlockIndex
from router.types import BackendId, BlockKey
from tests.support.servers import RedisServer

REPLICAS = [BackendId(f"http://r{i}:8000") for i in range(3)]
POOL = [BlockKey(k) for k in (0, 1, 2**63, 2**64 - 1, 0x9E3779B97F4A7C15, 12345, 2**53 + 1, 7)]
replicas = st.sampled_from(REPLICAS)
chains = st.lists(st.sampled_from(POOL), min_size=0, max_size=6)
ttls = st.sampled_from(
    [None, 600.0]
)  # long TTLs: nothing expires mid-test; TTL timing is in the contract tests


class Model:
    """replica -> keys in LRU order (oldest first): a dict used as an ordered set."""

    def __init__(self) -> None:
        self.held: dict[BackendId, dict[BlockKey, None]] = {r: {} for r in REPLICAS}
        self.cap: dict[BackendId, int | None] = {r: None for r in REPLICAS}

    def record(self, r: BackendId, keys: list[BlockKey]) -> None:
        for k in keys:
            self.held[r].pop(k, None)
            self.held[r][k] = None
        self.trim(r)

    def trim(self, r: BackendId) -> None:
        cap = self.cap[r]
        while cap is not None and len(self.held[r]) > cap:
            del self.held[r][next(iter(self.held[r]))]

    def lookup(self, keys: list[BlockKey]) -> dict[BackendId, int]:
        out = {}
        for r, held in self.held.items():
            run = 0
            for k in keys:
                if k not in held:
                    break
                run += 1
            if run:
                out[r] = run
        return out


class IndexMachine(RuleBasedStateMachine):
    redis_url: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.index = RedisBlockIndex.from_url(
            self.redis_url, namespace=f"p{uuid.uuid4().hex[:10]}", deadline_ms=2000
        )
        self.model = Model()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @rule(r=replicas, keys=chains, ttl=ttls)
    def record(self, r: BackendId, keys: list[BlockKey], ttl: float | None) -> None:
        self.run(self.index.record(r, keys, ttl_s=ttl))
        self.model.record(r, keys)

    @rule(r=replicas, keys=chains)
    def remove(self, r: BackendId, keys: list[BlockKey]) -> None:
        self.run(self.index.remove(r, keys))
        for k in keys:
            self.model.held[r].pop(k, None)

    @rule(r=replicas)
    def clear(self, r: BackendId) -> None:
        assert self.run(self.index.clear(r)) == len(self.model.held[r])
        self.model.held[r] = {}

    @rule(r=replicas, cap=st.one_of(st.none(), st.integers(0, 5)))
    def set_capacity(self, r: BackendId, cap: int | None) -> None:
        self.run(self.index.set_capacity(r, cap))
        self.model.cap[r] = cap
        self.model.trim(r)

    @rule(keys=chains)
    def lookup(self, keys: list[BlockKey]) -> None:
        assert self.run(self.index.lookup(keys)) == self.model.lookup(keys)

    @invariant()
    def sizes_match(self) -> None:
        expected = {r: len(h) for r, h in self.model.held.items() if h}
        assert dict(self.run(self.index.sizes())) == expected

    @invariant()
    def every_held_chain_found(self) -> None:
        for r, held in self.model.held.items():
            keys = list(held)
            if keys:
                # a replica's held keys (in any order) look up as at least a run of its first one
                assert self.run(self.index.lookup(keys[:1])).get(r) == 1

    def teardown(self) -> None:
        self.run(self.index.clear_all())
        self.run(self.index.close())
        self.loop.close()


def test_redis_index_matches_model(redis_server: RedisServer) -> None:
    IndexMachine.redis_url = redis_server.url
    run_state_machine_as_test(
        IndexMachine,
        settings=settings(
            max_examples=60,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
