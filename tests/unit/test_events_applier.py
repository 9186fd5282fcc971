"""The ordered applier against a model of an engine's cache (hypothesis, no sockets).

A random run of engine operations (store a block under a held parent or at a root,
evict a held block, clear all, with or without a salt or an adapter) is encoded in
vLLM's wire format, decoded and applied; afterwards the index must credit the replica
with exactly the blocks the engine holds, each under the key the request path computes
from the block's whole token prefix. That is the whole point of precise mode.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.events.applier import ReplicaApplier
from router.events.decode import decode_message
from router.fleet.backend import Backend
from router.hashing.keys import prompt_keys
from router.index.memory import MemoryBlockIndex
from router.types import BackendId

BS = 4
URL = "http://127.0.0.1:1"

ops = st.lists(
    st.one_of(
        st.tuples(st.just("store"), st.integers(0, 10**6), st.integers(1, 3),
                  st.sampled_from([None, "salt-a"]), st.sampled_from([None, "adapter"])),
        st.tuples(st.just("evict"), st.integers(0, 10**6)),
        st.tuples(st.just("clear")),
    ),
    max_size=60,
)


class EngineModel:
    """What the engine holds: hash -> (namespace, salt, the block's whole token prefix)."""

    def __init__(self) -> None:
        self.held: dict[int, tuple[str, str | None, tuple[int, ...]]] = {}
        self.counter = itertools.count(1)

    def store(self, pick: int, n: int, salt: str | None, lora: str | None) -> dict[str, Any]:
        parents = sorted(self.held)
        parent = parents[pick % len(parents)] if parents and pick % 3 else None
        if parent is None:
            ns, salt_used, prefix = (lora or "base"), salt, ()
        else:
            ns, salt_used, prefix = self.held[parent]
        hashes, tokens = [], []
        for _ in range(n):
            c = next(self.counter)
            h = c * 2**40 + 2**63  # large: above 2**63 as vLLM's often are
            block = (c, *(i for i in range(1, BS)))  # unique content per block, as its unique hash says
            prefix = prefix + block
            self.held[h] = (ns, salt_used, prefix)
            hashes.append(h)
            tokens.extend(block)
        ev: dict[str, Any] = {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
                              "token_ids": tokens, "block_size": BS, "lora_id": None, "medium": "GPU",
                              "lora_name": None if ns == "base" else ns}
        if parent is None and salt_used is not None:
            ev["extra_keys"] = [[salt_used]] + [None] * (n - 1)
        return ev


@given(ops)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_index_equals_the_engines_cache_after_any_run(run: list[Any]) -> None:
    asyncio.run(_check(run))


async def _check(run: list[Any]) -> None:
    engine = EngineModel()
    index = MemoryBlockIndex()
    backend = Backend(id=BackendId(URL), url=URL, base_model="base", block_size=BS)
    applier = ReplicaApplier(backend, index, block_size=lambda: BS)
    for seq, op in enumerate(run):
        if op[0] == "store":
            events = [engine.store(op[1], op[2], op[3], op[4])]
        elif op[0] == "evict":
            if not engine.held:
                events = []
            else:
                victim = sorted(engine.held)[op[1] % len(engine.held)]
                del engine.held[victim]
                events = [{"type": "BlockRemoved", "block_hashes": [victim], "medium": "GPU"}]
        else:
            engine.held.clear()
            events = [{"type": "AllBlocksCleared"}]
        payload = msgspec.msgpack.encode([float(seq), events, 0])
        await applier.apply(decode_message([b"", seq.to_bytes(8, "big"), payload]))

    sizes = await index.sizes()
    assert sizes.get(BackendId(URL), 0) == len(engine.held)
    for ns, salt, prefix in engine.held.values():
        keys = prompt_keys(list(prefix), BS, ns, salt)
        # the block's own key (its ancestors may have been evicted before it, as an engine may do)
        assert index.lookup_now(keys[-1:]) == {BackendId(URL): 1}
    assert backend.precise == bool(run)
