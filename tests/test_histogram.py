"""The handling-time histogram: percentiles within one bucket of the exact value."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventwire.metrics import LatencyHistogram


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


@given(
    st.lists(st.floats(min_value=0, max_value=1e5, allow_nan=False), min_size=1, max_size=300),
    st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]),
)
def test_quantiles_are_never_below_and_at_most_one_bucket_above(
    values: list[float], q: float
) -> None:
    histogram = LatencyHistogram()
    for value in values:
        histogram.record(value)
    exact = exact_quantile(values, q)
    estimate = histogram.quantile(q)
    assert estimate >= exact or math.isclose(estimate, exact)
    # One bucket is at most 1/16 of an octave's lower edge wide; below 1 µs all is one bucket.
    assert estimate <= max(exact * 1.0625, 1e-6) + 1e-12
    assert histogram.count == len(values)
    assert histogram.max == max(values)


def test_empty_histogram_reports_zeros_and_rejects_bad_quantiles() -> None:
    histogram = LatencyHistogram()
    assert histogram.percentiles().p99 == 0.0
    assert histogram.buckets() == []
    with pytest.raises(ValueError, match="between 0 and 1"):
        histogram.quantile(1.5)


def test_buckets_are_cumulative_and_merge_adds() -> None:
    first, second = LatencyHistogram(), LatencyHistogram()
    for value in (0.001, 0.002, 0.5):
        first.record(value)
    second.record(3.0)
    first.merge(second)
    bounds = first.buckets()
    assert [count for _, count in bounds] == [1, 2, 3, 4]
    assert all(a[0] < b[0] for a, b in itertools.pairwise(bounds))
    assert bounds[-1][0] >= 3.0
    assert first.max == 3.0
    assert first.count == 4


def test_a_histogram_is_small_and_invisible_to_the_garbage_collector() -> None:
    # Every subscription has one: ten thousand subscriptions must not cost megabytes, nor
    # objects the collector traverses on every full collection.
    import gc
    import sys

    histogram = LatencyHistogram()
    for micros in (0.5, 3, 40, 900, 2e4, 1e9):
        histogram.record(micros / 1e6)
    assert not gc.is_tracked(histogram._counts)
    assert sys.getsizeof(histogram._counts) < 1024
    assert histogram.count == 6
    assert 1e3 <= histogram.quantile(1.0) <= 1e3 * 1.0625
    assert 40e-6 <= histogram.quantile(0.5) <= 40e-6 * 1.0625
