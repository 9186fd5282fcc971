"""Fixtures for the real-vLLM tests: one tiny model and one engine per session.

No skips: when the ``vllm`` tests are selected and ``.venv-vllm`` is missing, the
fixture fails with the command that fixes it (./scripts/setup-vllm, which .ci/run calls).
Start-up time is printed in the terminal summary; the engine's log is printed when it
fails to start and its path is in every failing test's message.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.vllm.engine import VLLM_PYTHON, VLLM_VENV, VllmEngine, build_tiny_model, missing_venv_message

_startups: list[tuple[str, float]] = []


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    if not VLLM_PYTHON.exists():
        pytest.fail(missing_venv_message(), pytrace=False)
    return VLLM_PYTHON


@pytest.fixture(scope="session")
def tiny_model_dir(vllm_python: Path) -> Path:
    """Tiny random Llama with the project's tokenizer; cached in .venv-vllm (never committed)."""
    return build_tiny_model(VLLM_VENV / "test-models")


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmEngine]:
    log = tmp_path_factory.mktemp("vllm") / "engine.log"
    engine = VllmEngine(tiny_model_dir, log)
    try:
        _startups.append(("start", engine.start()))
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield engine
    finally:
        if len(engine.startup_s) > 1:
            _startups.extend(("restart", s) for s in engine.startup_s[1:])
        engine.stop()


@pytest.fixture
def fresh_engine(vllm_engine: VllmEngine) -> VllmEngine:
    """The session's engine with an empty prefix cache (and alive: a test may have restarted it)."""
    if vllm_engine.proc is None or vllm_engine.proc.poll() is not None:
        vllm_engine.start()
    vllm_engine.reset_prefix_cache()
    return vllm_engine


@pytest.fixture
def engine_http(vllm_engine: VllmEngine) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vllm_engine.url, timeout=60.0) as client:
        yield client


VLLM_TEST_TIMEOUT_S = 480
"""Whichever vllm test runs first pays the engine's start-up (up to engine.STARTUP_TIMEOUT_S)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if item.get_closest_marker("vllm") is None or here not in item.path.parents:
            continue
        marker = item.get_closest_marker("timeout")
        current = float(marker.args[0]) if marker is not None and marker.args else 0.0
        if current < VLLM_TEST_TIMEOUT_S:
            item.add_marker(pytest.mark.timeout(VLLM_TEST_TIMEOUT_S), append=False)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _startups:
        figures = ", ".join(f"{kind} {seconds:.1f} s" for kind, seconds in _startups)
        terminalreporter.write_line(f"vLLM engine start-up: {figures}")
