"""router.metrics.Histogram (bisecting observe) against prometheus_client's own Histogram."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client import Histogram as LibraryHistogram

from router.metrics import Histogram

BUCKETS = (1e-5, 2.5e-5, 1e-3, 0.1, 1, 5, 60)


def samples(h: LibraryHistogram) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for m in h.collect() for s in m.samples if not s.name.endswith("_created")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(0, 100, allow_nan=False), st.sampled_from(BUCKETS)), max_size=50))
def test_same_buckets_and_sum_as_the_library(values: list[float]) -> None:
    ours = Histogram("h", "test", ["model"], buckets=BUCKETS, registry=CollectorRegistry())
    theirs = LibraryHistogram("h", "test", ["model"], buckets=BUCKETS, registry=CollectorRegistry())
    for v in values:  # values on a bound fall in that bucket (le is "less or equal")
        ours.labels("m").observe(v)
        theirs.labels("m").observe(v)
    assert samples(ours) == samples(theirs)


def test_a_labelled_parent_still_refuses_observations() -> None:
    h = Histogram("p", "test", ["model"], buckets=BUCKETS, registry=CollectorRegistry())
    with pytest.raises(ValueError):
        h.observe(1.0)
