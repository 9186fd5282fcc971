"""A per-replica circuit breaker over request outcomes. Pure: the clock is passed in.

    closed --(breaker_failures consecutive failures)--> open
    open   --(cooldown elapsed)--> half-open (one trial request let through)
    half-open --(trial succeeds)--> closed
    half-open --(trial fails)--> open again, cooldown restarts

A trial is an ordinary request and may stream for minutes; a trial still running after
another cooldown lets one more through, so one long answer cannot keep a recovered replica
out of rotation.

Passive: fed by request outcomes (``Fleet.release``), independent of the active health
probe, which catches a replica that answers /health but fails real requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    failures_to_open: int
    cooldown_s: float
    _state: BreakerState = BreakerState.CLOSED
    _failures: int = 0
    _opened_at: float = 0.0
    _trial_in_flight: bool = False
    _trial_at: float = 0.0

    def state(self, now: float) -> BreakerState:
        if self._state is BreakerState.OPEN and now - self._opened_at >= self.cooldown_s:
            self._state = BreakerState.HALF_OPEN
            self._trial_in_flight = False
        return self._state

    def allows(self, now: float) -> bool:
        """May a new request go to this replica now? (half-open: only while no trial runs)."""
        if self._state is BreakerState.CLOSED:  # the common case, on every request
            return True
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and (
            not self._trial_in_flight or now - self._trial_at >= self.cooldown_s
        )

    def on_dispatch(self, now: float) -> None:
        if self.state(now) is BreakerState.HALF_OPEN:
            self._trial_in_flight, self._trial_at = True, now

    def record(self, ok: bool, now: float) -> None:
        state = self.state(now)
        if ok:
            self._failures = 0
            if state is BreakerState.HALF_OPEN:
                self._state = BreakerState.CLOSED
                self._trial_in_flight = False
            return
        self._failures += 1
        if state is BreakerState.HALF_OPEN or (
            state is BreakerState.CLOSED and self._failures >= self.failures_to_open
        ):
            self._state = BreakerState.OPEN
            self._opened_at = now
            self._trial_in_flight = False

    def reset(self) -> None:
        """Forget history (the replica restarted or was re-added)."""
        self._state, self._failures, self._trial_in_flight = BreakerState.CLOSED, 0, False
