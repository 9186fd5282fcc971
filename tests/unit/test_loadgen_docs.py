"""docs/loadtest.md names only flags and workloads the commands really have."""

from __future__ import annotations

import re
from pathlib import Path

from loadtest.compare import build_parser as compare_parser
from loadtest.runner.cli import build_parser as run_parser
from loadtest.workloads import WORKLOAD_NAMES

DOC = Path(__file__).resolve().parents[2] / "docs" / "loadtest.md"


def _flags(parser: object) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}  # type: ignore[attr-defined]


def test_every_flag_in_the_doc_exists() -> None:
    text = DOC.read_text()
    known = _flags(run_parser()) | _flags(compare_parser()) | {"--port", "--engines", "--cache-blocks", "--policy",
                                                               "--tokenizer", "--backend"}
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", text))
    assert used, "the doc shows no flags at all"
    assert used <= known, f"flags in docs/loadtest.md that no command has: {sorted(used - known)}"


def test_every_workload_is_documented() -> None:
    text = DOC.read_text()
    assert all(f"`{name}`" in text for name in WORKLOAD_NAMES)
    assert (DOC.parent / "loadtest-hit-rate.png").read_bytes()[:4] == b"\x89PNG"
