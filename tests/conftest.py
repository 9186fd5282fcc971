from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import RedisServer

ROOT = Path(__file__).resolve().parent.parent
SIM_MODEL = ROOT / "loadtest" / "models" / "sim-model"


@pytest.fixture(scope="session")
def sim_model_dir() -> Path:
    return SIM_MODEL


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server per test session; tests isolate by namespace, not by server."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def namespace() -> str:
    """A fresh key namespace, so tests sharing the session's Redis never see each other's keys."""
    return f"t{uuid.uuid4().hex[:12]}"
