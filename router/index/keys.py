"""Every Redis key cache-router writes, in one place.

All keys start with the configured namespace (``index.namespace``), so deployments and
tests can share one Redis. Keys hold only block hashes, replica ids and times, never
prompt text.

Layout (``ns`` = namespace, ``R`` = a replica id, i.e. its base URL, ``D`` = the first 12 hex digits
of xxh64("ns|R"), the replica's Redis Cluster hash tag):

``ns:replicas``            set of replica ids that have (or had) entries: lookups and
                           ``sizes()`` walk it instead of scanning the keyspace.
``ns:r:{D}:R:held``       hash, field = 8-byte big-endian block key, value = expiry in
                           Redis-server milliseconds, ``0`` = confirmed (never expires).
                           Lookups read only this.
``ns:r:{D}:R:lru``        sorted set, same members, score = the replica's recency counter
                           (higher = more recently used): capacity trimming reads it.
``ns:r:{D}:R:exp``        sorted set of the TTL'd entries only, score = expiry ms:
                           ``purge_expired`` reads it instead of walking every entry.
``ns:r:{D}:R:meta``       hash: ``seq`` (the recency counter), ``cap`` (capacity in blocks).
``ns:load:{ns|load}``   hash of shared in-flight counts, field ``router|backend`` ->
                           ``count|expiry_ms`` (``router.fleet.shared_load``).

The ``{D}`` part is the Redis Cluster hash tag: a replica's four keys share a slot,
so every write to one replica is a single atomic Lua call on one node, and clearing it
deletes three keys (meta, the capacity, stays). Why per replica and not per chain is explained in
``router.index.redis``.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence

import xxhash

from router.types import BackendId, BlockKey

_U64 = struct.Struct(">Q")


def block_member(key: BlockKey) -> bytes:
    # Fixed 8-byte binary: exact for all 64 bits (Lua numbers are doubles and would round),
    # half the size of hex.
    return _U64.pack(key)


def block_members(keys: Sequence[BlockKey]) -> list[bytes]:
    packed = struct.pack(f">{len(keys)}Q", *keys)
    return [packed[i : i + 8] for i in range(0, len(packed), 8)]


def block_blob(keys: Sequence[BlockKey]) -> bytes:
    """A chain as one argument (8 bytes per key): the scripts cut it into members."""
    return struct.pack(f">{len(keys)}Q", *keys)


def member_key(member: bytes) -> BlockKey:
    return BlockKey(_U64.unpack(member)[0])


def replicas(ns: str) -> str:
    return f"{ns}:replicas"


@functools.lru_cache(maxsize=4096)
def _tag(ns: str, replica: str) -> str:
    # The hash tag is a digest, not the replica id itself: CRC16 of near-identical ids
    # (http://10.0.0.1:8000, http://10.0.0.2:8000, ...) lands in neighbouring slots, so a
    # whole fleet could sit on one master. The id follows, outside the tag, for humans.
    digest = xxhash.xxh64_hexdigest(f"{ns}|{replica}".encode())[:12]
    return f"{ns}:r:{{{digest}}}:{replica}"


def replica_lru(ns: str, replica: BackendId) -> str:
    return f"{_tag(ns, replica)}:lru"


def replica_exp(ns: str, replica: BackendId) -> str:
    return f"{_tag(ns, replica)}:exp"


def replica_meta(ns: str, replica: BackendId) -> str:
    return f"{_tag(ns, replica)}:meta"


def replica_held(ns: str, replica: BackendId) -> str:
    return f"{_tag(ns, replica)}:held"


def replica_keys(ns: str, replica: BackendId) -> list[str]:
    """The KEYS of the per-replica write script, in this order: lru, exp, meta, held."""
    return [
        replica_lru(ns, replica),
        replica_exp(ns, replica),
        replica_meta(ns, replica),
        replica_held(ns, replica),
    ]


def shared_load(ns: str) -> str:
    return f"{ns}:load:{{{ns}|load}}"
