"""Backends the index contract runs against. A new backend adds one branch here, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from router.index import BlockIndex, MemoryBlockIndex


class FakeClock:
    """A settable clock for TTL tests of the in-process backend."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory"])
async def index(request: pytest.FixtureRequest) -> AsyncIterator[BlockIndex]:
    backend: BlockIndex
    if request.param == "memory":
        backend = MemoryBlockIndex()
    else:  # pragma: no cover - every param needs a branch
        raise AssertionError(request.param)
    yield backend
    await backend.clear_all()
    await backend.close()


@pytest.fixture
def make_index() -> Callable[[], BlockIndex]:
    return MemoryBlockIndex
