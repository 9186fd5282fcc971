"""Mooncake (FAST'25) trace files: read them, and turn each ``hash_id`` into a block of token ids.

A Mooncake record is ``{"timestamp": ms, "input_length", "output_length", "hash_ids"}``
where each id names a 512-token prefix block and ids are prefix-chained (the same id at
position j means the same first j+1 blocks; the last block is partial). Replaying it
needs prompts whose shared prefixes are exactly the trace's: every id maps to a fixed
pseudo-random block of token ids (seeded, so runs repeat), and a prompt is its blocks
concatenated, the last one cut to the request's length. Special token ids are avoided.

Provenance and licences of the files: ``SOURCES.md`` beside them.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import orjson

TRACE_BLOCK_TOKENS = 512   # tokens per hash_id in the Mooncake traces
FIRST_TOKEN_ID = 5         # 0..4 are <unk> <s> </s> <|im_start|> <|im_end|> in the shared tokenizer
VOCAB = 8192
TRACE_FILES = {
    "mooncake": "mooncake_fast25_conversation_trace.jsonl",
    "mooncake_synthetic": "mooncake_fast25_synthetic_trace.jsonl",
}


@dataclass(frozen=True)
class TraceRecord:
    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def trace_dirs() -> list[Path]:
    """Where trace files are looked for: $CACHE_ROUTER_TRACES, then ../shared/traces beside the repo."""
    root = Path(__file__).resolve().parent.parent
    dirs = [Path(p) for p in os.environ.get("CACHE_ROUTER_TRACES", "").split(os.pathsep) if p]
    return [*dirs, root.parent / "shared" / "traces", root / "traces"]


def find_trace(name_or_path: str) -> Path:
    """A workload name (``mooncake``, ``mooncake_synthetic``) or a file path -> the file."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    filename = TRACE_FILES.get(name_or_path, name_or_path)
    for folder in trace_dirs():
        if (folder / filename).is_file():
            return folder / filename
    raise FileNotFoundError(f"trace {name_or_path!r} not found in {[str(d) for d in trace_dirs()]}; "
                            "set CACHE_ROUTER_TRACES or pass --trace FILE")


def read_mooncake(path: Path, limit: int | None = None, offset: int = 0) -> Iterator[TraceRecord]:
    """Records in file order (the files are sorted by timestamp); blank lines skipped."""
    seen = 0
    with path.open("rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            if seen < offset:
                seen += 1
                continue
            if limit is not None and seen - offset >= limit:
                return
            seen += 1
            row = orjson.loads(line)
            yield TraceRecord(int(row["timestamp"]), int(row["input_length"]), int(row["output_length"]),
                              tuple(int(h) for h in row["hash_ids"]))


@lru_cache(maxsize=65536)
def block_token_ids(seed: int, hash_id: int, block_tokens: int) -> tuple[int, ...]:
    """The fixed token ids standing for ``hash_id``: same (seed, id, size) -> same block."""
    rng = random.Random(f"mooncake:{seed}:{hash_id}:{block_tokens}")
    return tuple(rng.randrange(FIRST_TOKEN_ID, VOCAB) for _ in range(block_tokens))


def scaled_input_length(record: TraceRecord, block_tokens: int) -> int:
    """The request's length at ``block_tokens`` per id, keeping its last block's fill ratio."""
    n = len(record.hash_ids)
    if n == 0:
        return 0
    last = record.input_length - (n - 1) * TRACE_BLOCK_TOKENS
    last_scaled = max(1, min(block_tokens, round(last * block_tokens / TRACE_BLOCK_TOKENS)))
    return (n - 1) * block_tokens + last_scaled


def prompt_token_ids(record: TraceRecord, seed: int, block_tokens: int = TRACE_BLOCK_TOKENS) -> tuple[int, ...]:
    """The prompt of one record: its blocks in order, cut to the (scaled) input length."""
    total = scaled_input_length(record, block_tokens)
    ids: list[int] = []
    for hash_id in record.hash_ids:
        ids.extend(block_token_ids(seed, hash_id, block_tokens))
    return tuple(ids[:total])
