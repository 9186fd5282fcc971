"""Faults a simulated engine can be told to show, from the command line or at runtime.

``POST /sim/faults`` with any subset of the fields below changes them on a running
engine (unknown fields or wrong types are a 400); ``POST /sim/restart`` restarts it
(cache emptied, counters and the KV-event sequence back to 0, in-flight requests cut).

It owns the switches; ``app`` and ``engine`` act on them.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class Faults:
    error_rate: float = 0.0
    """Share of generation requests answered with ``error_status`` before any work."""
    error_status: int = 500
    hang: bool = False
    """Generation requests are accepted and then never answered (until switched off)."""
    die_after_tokens: int | None = None
    """A stream is cut (connection dropped, no [DONE]) after this many tokens."""
    stall_after_tokens: int | None = None
    """A stream goes silent after this many tokens, connection open (an idle-stream timeout's case)."""
    health_delay_s: float = 0.0
    """GET /health answers only after this long (a slow probe)."""
    health_fail: bool = False
    """GET /health answers 503."""
    down_until: float = 0.0
    """Monotonic time until which a restarting engine answers 503 to everything."""
    _unhung: asyncio.Event | None = field(default=None, repr=False, compare=False)

    async def wait_while_hung(self) -> None:
        """A hung engine accepts a request and never answers it, until the hang is switched off."""
        if not self.hang:
            return
        if self._unhung is None:
            self._unhung = asyncio.Event()
        await self._unhung.wait()

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply a partial update after checking every field; nothing changes on a bad one."""
        known = {f.name: f for f in fields(self) if f.name not in ("down_until", "_unhung")}
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown fault {name!r}; known: {sorted(known)}")
            checked[name] = _check(name, value)
        for name, value in checked.items():
            setattr(self, name, value)
        if not self.hang and self._unhung is not None:
            self._unhung.set()
            self._unhung = None

    def should_fail(self, rng: random.Random) -> bool:
        return self.error_rate > 0 and rng.random() < self.error_rate

    @property
    def down(self) -> bool:
        return time.monotonic() < self.down_until

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("down_until", "_unhung")
        }


def _check(name: str, value: Any) -> Any:
    if name in ("hang", "health_fail"):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a boolean")
        return value
    if name in ("die_after_tokens", "stall_after_tokens"):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative integer or null")
        return value
    if name == "error_status":
        if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 599:
            raise ValueError("error_status must be an HTTP error status")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a non-negative number")
    if name == "error_rate" and value > 1:
        raise ValueError("error_rate must be in [0, 1]")
    return float(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("faults (also changeable at runtime: POST /sim/faults)")
    group.add_argument(
        "--error-rate", type=float, default=0.0, help="share of requests answered with an error"
    )
    group.add_argument("--error-status", type=int, default=500)
    group.add_argument("--hang", action="store_true", help="accept requests and never answer")
    group.add_argument("--die-after-tokens", type=int, default=None, help="cut every stream after N tokens")
    group.add_argument(
        "--stall-after-tokens", type=int, default=None, help="streams go silent after N tokens"
    )
    group.add_argument("--health-delay", type=float, default=0.0, help="seconds before /health answers")
    group.add_argument("--health-fail", action="store_true", help="/health answers 503")


def from_args(args: argparse.Namespace) -> Faults:
    faults = Faults()
    faults.update(
        {
            "error_rate": args.error_rate,
            "error_status": args.error_status,
            "hang": args.hang,
            "die_after_tokens": args.die_after_tokens,
            "stall_after_tokens": args.stall_after_tokens,
            "health_delay_s": args.health_delay,
            "health_fail": args.health_fail,
        }
    )
    return faults
