"""Mooncake trace replay as a workload: token-id prompts with the trace's sharing and clock."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from loadtest.traces import TRACE_BLOCK_TOKENS, find_trace, prompt_token_ids, read_mooncake
from loadtest.workloads.model import Conversation, Turn, Workload


@dataclass(frozen=True)
class TraceParams:
    """Replay knobs. Defaults shrink the trace so a sim fleet replays it in seconds."""

    requests: int = 200            # records replayed (from ``offset``)
    offset: int = 0                # records skipped first
    block_tokens: int = 32         # tokens per hash_id (the trace's own is 512): the size scale factor
    time_scale: float = 1.0        # arrival = timestamp x time_scale (0.1 replays ten times faster)
    output_scale: float = 1.0      # max_tokens = output_length x output_scale ...
    max_output_tokens: int = 32    # ... capped here, so a few long answers do not dominate the run
    max_input_tokens: int | None = None  # clip longer prompts (their prefixes stay shared) to fit small engines
    trace: str | None = None       # a file path; default: the workload's file in the traces folder


def build_mooncake(name: str, seed: int, params: TraceParams) -> Workload:
    path = find_trace(params.trace or name)
    records = list(read_mooncake(path, limit=params.requests, offset=params.offset))
    t0 = records[0].timestamp_ms if records else 0
    conversations = []
    for i, rec in enumerate(records):
        out = max(1, min(params.max_output_tokens, round(rec.output_length * params.output_scale)))
        ids = prompt_token_ids(rec, seed, params.block_tokens)
        if params.max_input_tokens is not None:
            ids = ids[: params.max_input_tokens]
        turn = Turn(token_ids=ids, max_tokens=out)
        conversations.append(Conversation(i, (turn,), arrival_s=(rec.timestamp_ms - t0) / 1000 * params.time_scale))
    info: dict[str, Any] = asdict(params)
    info.update(trace_file=path.name, size_scale=params.block_tokens / TRACE_BLOCK_TOKENS)
    return Workload(name, seed, tuple(conversations), info)
