"""The BlockIndex contract: what every index backend promises, written once.

An index maps block keys (``router.types.BlockKey``) to the replicas believed to hold
that block in their KV cache. It holds hashes, replica ids and times: never prompt text.

Contract (``tests/contract/test_index_contract.py`` runs it against every backend):

1. ``lookup(keys)`` returns, for each replica, how many *leading* blocks of ``keys`` it
   holds: the length of the run ``keys[0], keys[1], ...`` it holds without a gap.
   Replicas with a zero run are absent. The scan stops at the first key that no replica
   holds. Expired entries count as absent. A lookup never changes recency. Empty ``keys``
   gives an empty mapping. Duplicate keys in the input are treated positionally.
2. ``record(replica, keys, ttl_s=...)`` says the replica holds every key in ``keys``
   (a chain, in order). New entries are added, existing ones refreshed and made the
   replica's most recently used (the later a key is in ``keys``, the more recent; so an
   LRU trim drops a chain's tail first, as the engine does). ``ttl_s=None`` means the
   entry does not expire (confirmed by the engine). An entry's expiry only ever extends:
   a TTL'd record never shortens a confirmed entry or an earlier, longer TTL. A backend
   may skip refreshing a TTL'd entry recorded less than ``memory.REFRESH_EVERY_S`` (1 s, or
   a tenth of its TTL) ago: its expiry and recency then lag by at most that much.
3. After a record the replica holds at most its capacity (``set_capacity``; ``None``:
   unbounded, the default): the least recently used entries beyond it are dropped.
   Lowering the capacity trims at once.
4. ``remove(replica, keys)`` drops those entries; unknown keys and replicas are ignored.
5. ``clear(replica)`` drops every entry of that replica, in time proportional to that
   replica's entries, and returns how many it dropped; an unknown replica gives 0.
   Other replicas are untouched. ``clear_all()`` drops everything this index owns.
6. ``sizes()`` returns the number of live entries per replica (replicas with none may be
   absent). Expired entries may linger in the count until the backend purges them, but
   never beyond ``purge_expired()``.
7. Backends that talk to a server raise ``IndexUnavailable`` (and only that) when it
   cannot answer within their deadline; callers fail open. The in-process backend never raises.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from router.types import BackendId, BlockKey


class IndexUnavailable(Exception):
    """The index could not answer in time (server down, slow or restarting). Route without it."""


@runtime_checkable
class BlockIndex(Protocol):
    name: str
    """Short backend name for metrics and logs: ``memory``, ``redis``."""

    async def lookup(self, keys: Sequence[BlockKey]) -> Mapping[BackendId, int]: ...

    async def record(self, replica: BackendId, keys: Sequence[BlockKey], *, ttl_s: float | None) -> None: ...

    async def remove(self, replica: BackendId, keys: Sequence[BlockKey]) -> None: ...

    async def clear(self, replica: BackendId) -> int: ...

    async def clear_all(self) -> None: ...

    async def set_capacity(self, replica: BackendId, blocks: int | None) -> None: ...

    async def sizes(self) -> Mapping[BackendId, int]: ...

    async def purge_expired(self) -> int: ...

    async def close(self) -> None: ...
