"""Circuit breaker and health verdicts: pure transitions with the clock passed in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from router.fleet.breaker import BreakerState, CircuitBreaker
from router.fleet.prober import HealthTracker


def test_opens_after_consecutive_failures_only() -> None:
    b = CircuitBreaker(failures_to_open=3, cooldown_s=5.0)
    for ok in (False, False, True, False, False):  # a success resets the count
        b.record(ok, now=0.0)
    assert b.state(0.0) is BreakerState.CLOSED and b.allows(0.0)
    b.record(False, now=1.0)
    assert b.state(1.0) is BreakerState.OPEN and not b.allows(1.0)


def test_half_open_lets_one_trial_then_closes_or_reopens() -> None:
    b = CircuitBreaker(failures_to_open=1, cooldown_s=5.0)
    b.record(False, now=10.0)
    assert not b.allows(14.9)
    assert b.state(15.0) is BreakerState.HALF_OPEN and b.allows(15.0)
    b.on_dispatch(15.0)
    assert not b.allows(15.1)  # one trial at a time
    assert b.allows(20.0)  # ... unless it has run a whole cooldown (a long stream)
    b.record(False, now=16.0)  # trial failed: open again, cooldown restarts
    assert b.state(20.9) is BreakerState.OPEN
    assert b.state(21.0) is BreakerState.HALF_OPEN
    b.on_dispatch(21.0)
    b.record(True, now=21.5)
    assert b.state(21.5) is BreakerState.CLOSED and b.allows(21.5)
    b.record(False, now=22.0)
    assert b.state(22.0) is BreakerState.OPEN  # failures_to_open=1
    b.reset()
    assert b.allows(22.0)


@given(st.lists(st.tuples(st.booleans(), st.floats(0, 3)), max_size=60), st.integers(1, 5))
def test_never_admits_while_open_within_cooldown(steps: list[tuple[bool, float]], n: int) -> None:
    b = CircuitBreaker(failures_to_open=n, cooldown_s=2.0)
    now, streak, opened_at = 0.0, 0, None
    for ok, dt in steps:
        now += dt
        was = b.state(now)
        b.record(ok, now)
        streak = 0 if ok else streak + 1
        if b.state(now) is BreakerState.OPEN and was is not BreakerState.OPEN:
            opened_at = now
            assert was is BreakerState.HALF_OPEN or streak >= n
        if opened_at is not None and now - opened_at < 2.0:
            assert not b.allows(now)


def test_health_tracker_thresholds() -> None:
    t = HealthTracker(failure_threshold=2, success_threshold=2)
    assert not t.healthy  # unhealthy until proven otherwise
    assert not t.observe(True) and not t.healthy
    assert t.observe(True) and t.healthy
    assert not t.observe(False) and t.healthy  # one failed probe is noise
    assert not t.observe(True)
    assert not t.observe(False)
    assert t.observe(False) and not t.healthy
