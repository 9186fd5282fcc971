"""Rendezvous (highest-random-weight) hashing: a stable replica order per key.

Every router replica computes the same order from the same key without talking to the
others, and adding or removing a replica only moves the keys that replica wins or held
(about 1/n of them). Used for affinity without an index (fail-open: by session, else by first
block) and by the ``prefix_hash`` baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

from router.scheduling.model import Candidate

_xxh = xxhash.xxh3_64_intdigest
_MASK = 2**64 - 1


def weight(backend_id: str, key: int) -> int:
    return _xxh(backend_id.encode(), key & _MASK)


def order(candidates: Sequence[Candidate], key: int) -> list[Candidate]:
    """Candidates by descending weight for ``key`` (ids are unique, so no ties in practice)."""
    return sorted(candidates, key=lambda c: (weight(c.id, key), c.id), reverse=True)


def session_key(session: str) -> int:
    return _xxh(session.encode())
