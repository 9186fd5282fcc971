"""Seeded workloads: what to send, independent of how fast or where.

``build_workload(name, seed, **params)`` is the one entry point; names are in
``WORKLOAD_NAMES``. Text workloads (shared_prefix, multi_turn, hot_prefix, zero_reuse,
churn) are sent as chat or completion requests, chosen by the runner's ``api``; trace
replays (mooncake, mooncake_synthetic) are token-id completions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from loadtest.workloads.model import Api, Conversation, History, Turn, Workload
from loadtest.workloads.mooncake import TraceParams, build_mooncake
from loadtest.workloads.synthetic import GENERATORS, TextParams, build_text, churn_prefix_count

TRACE_WORKLOADS = ("mooncake", "mooncake_synthetic")
WORKLOAD_NAMES = (*GENERATORS, *TRACE_WORKLOADS)


def build_workload(name: str, seed: int, **params: Any) -> Workload:
    """The workload ``name`` from ``seed``; unknown parameters for that kind are ignored (None too)."""
    if name not in WORKLOAD_NAMES:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOAD_NAMES)}")
    cls = TraceParams if name in TRACE_WORKLOADS else TextParams
    fields = {f.name for f in dataclasses.fields(cls)}
    chosen = cls(**{k: v for k, v in params.items() if k in fields and v is not None})
    if isinstance(chosen, TraceParams):
        return build_mooncake(name, seed, chosen)
    return build_text(name, seed, chosen)


__all__ = ["TRACE_WORKLOADS", "WORKLOAD_NAMES", "Api", "Conversation", "History", "TextParams", "TraceParams",
           "Turn", "Workload", "build_workload", "churn_prefix_count"]
