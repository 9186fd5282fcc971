"""Which replica holds which blocks: the BlockIndex contract and its backends."""

from router.index.base import BlockIndex, IndexUnavailable
from router.index.memory import MemoryBlockIndex

__all__ = ["BlockIndex", "IndexUnavailable", "MemoryBlockIndex"]
