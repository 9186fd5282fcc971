"""Filters: which replicas may take this request at all.

Each filter is a plain predicate over a frozen ``Candidate``; a replica must pass every
one. Filters never rank: ranking is the scorers' job (``router.scheduling.scorers``).
What happens when nobody passes is decided here too, because only the filters know
whether the fleet is down (503, come back later) or merely full (admission may queue).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from router.errors import NoHealthyBackend
from router.scheduling.model import Candidate

Filter = Callable[[Candidate], bool]


def serves_model(c: Candidate) -> bool:
    return c.serves_model


def healthy(c: Candidate) -> bool:
    return c.healthy


def circuit_closed(c: Candidate) -> bool:
    return not c.circuit_open


def not_draining(c: Candidate) -> bool:
    return not c.draining


def under_max_concurrency(c: Candidate) -> bool:
    return c.max_concurrency is None or c.in_flight < c.max_concurrency


# Order matters only for the error message: the first filter a replica fails names why.
AVAILABILITY: tuple[tuple[str, Filter], ...] = (
    ("model", serves_model),
    ("health", healthy),
    ("circuit", circuit_closed),
    ("draining", not_draining),
)
CAPACITY: tuple[tuple[str, Filter], ...] = (("concurrency", under_max_concurrency),)
DEFAULT_FILTERS: tuple[tuple[str, Filter], ...] = AVAILABILITY + CAPACITY

# A replica that is full frees a slot within a request's lifetime; a fleet that is down
# comes back no sooner than a couple of health-probe intervals (HealthConfig.interval_s = 2 s).
SATURATED_RETRY_AFTER_S = 1.0
UNAVAILABLE_RETRY_AFTER_S = 5.0


class Saturated(NoHealthyBackend):
    """Every available replica is at its concurrency cap: a queue may wait for a slot.

    A subclass of ``NoHealthyBackend`` so callers that only know the interface still
    answer 503 with Retry-After; admission control catches this one to queue instead.
    """


def _passes_default(c: Candidate) -> bool:
    # DEFAULT_FILTERS inlined: this runs for every replica of every request. The property
    # test in tests/unit/test_sched_policies.py checks it against the named filters.
    return (c.serves_model and c.healthy and not c.circuit_open and not c.draining
            and (c.max_concurrency is None or c.in_flight < c.max_concurrency))


def eligible(
    candidates: Sequence[Candidate], filters: Sequence[tuple[str, Filter]] = DEFAULT_FILTERS
) -> list[Candidate]:
    if filters is DEFAULT_FILTERS:
        return [c for c in candidates if _passes_default(c)]
    return [c for c in candidates if all(f(c) for _, f in filters)]


def no_backend_error(model: str, candidates: Sequence[Candidate]) -> NoHealthyBackend:
    """The error to raise when ``eligible`` returned nothing: full (Saturated) or down."""
    available = [c for c in candidates if all(f(c) for _, f in AVAILABILITY)]
    if available:
        return Saturated(
            f"every replica serving model {model!r} is at its concurrency limit",
            retry_after=SATURATED_RETRY_AFTER_S,
        )
    if not candidates:
        why = "no replica serves it"
    else:
        counts: dict[str, int] = {}
        for c in candidates:
            failed = next(name for name, f in AVAILABILITY if not f(c))
            counts[failed] = counts.get(failed, 0) + 1
        why = ", ".join(f"{n} failed {name}" for name, n in sorted(counts.items()))
    return NoHealthyBackend(
        f"no healthy replica for model {model!r} ({why})", retry_after=UNAVAILABLE_RETRY_AFTER_S
    )
