"""Handling-time histograms: percentiles of events' handling time, at a fixed cost.

Each subscription records the events it finishes into a `LatencyHistogram` (each event on
its own while handlers take over 20 µs; fast events back to back at the mean of a batch):
log-spaced buckets, 16 per doubling (3 to 6% apart), from 1 µs to about 12 days, kept sparse.
Recording is one `math.frexp` and a dict update; a percentile is exact to within one bucket:
the reported value is the bucket's upper bound (capped at the true maximum), at most 6.25%
above the true value.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil, frexp

_SUB_BUCKETS = 16  # per doubling
_OCTAVES = 40  # 2**40 µs is about 12.7 days
_BUCKETS = _SUB_BUCKETS * _OCTAVES + 1


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Handling-time percentiles, in seconds (0.0 when nothing was recorded)."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float


def _bucket_upper_bound(index: int) -> float:
    """The largest duration (seconds) that falls in bucket `index`."""
    if index == 0:
        return 1e-6
    exponent, sub = divmod(index - 1, _SUB_BUCKETS)
    return (0.5 + (sub + 1) / (2 * _SUB_BUCKETS)) * 2.0 ** (exponent + 1) * 1e-6


class LatencyHistogram:
    """Counts of durations in log-spaced buckets; cheap to record, mergeable, bounded."""

    __slots__ = ("_counts", "count", "max", "total")

    def __init__(self) -> None:
        # Sparse, by bucket index: a subscription's times span a few dozen buckets, and a dict
        # of ints costs the garbage collector nothing, so many idle subscriptions stay cheap.
        self._counts: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def record(self, seconds: float, weight: int = 1) -> None:
        """Add a duration, in seconds, standing for `weight` events (a sample of a busy run)."""
        self.count += weight
        self.total += seconds * weight
        if seconds > self.max:
            self.max = seconds
        micros = seconds * 1e6
        if micros <= 1.0:
            index = 0
        else:
            # micros = m * 2**e with m in [0.5, 1): octave e-1, and 16 slices of [0.5, 1).
            mantissa, exponent = frexp(micros)
            index = 1 + (exponent - 1) * _SUB_BUCKETS + int((mantissa - 0.5) * 2 * _SUB_BUCKETS)
            if index >= _BUCKETS:
                index = _BUCKETS - 1
        counts = self._counts
        counts[index] = counts.get(index, 0) + weight

    def quantile(self, q: float) -> float:
        """The duration (seconds) below which a fraction `q` (0..1) of the recorded ones lie;
        0.0 when nothing was recorded."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile q must be between 0 and 1, got {q!r}")
        return self._quantile(self.buckets(), q)

    def percentiles(self) -> Percentiles:
        """p50, p90, p99 and the maximum."""
        pairs = self.buckets()  # once for all three
        return Percentiles(
            count=self.count,
            p50=self._quantile(pairs, 0.5),
            p90=self._quantile(pairs, 0.9),
            p99=self._quantile(pairs, 0.99),
            max=self.max,
        )

    def _quantile(self, pairs: list[tuple[float, int]], q: float) -> float:
        if not self.count:
            return 0.0
        rank = max(1, ceil(q * self.count))  # nearest-rank definition
        for upper_bound, seen in pairs:
            if seen >= rank:
                return min(upper_bound, self.max)
        return self.max

    def buckets(self) -> list[tuple[float, int]]:
        """Cumulative ``(upper bound in seconds, count)`` pairs of the non-empty range, for
        exporters (e.g. Prometheus histograms)."""
        pairs: list[tuple[float, int]] = []
        seen = 0
        for index, count in self._sorted():
            seen += count
            pairs.append((_bucket_upper_bound(index), seen))
        return pairs

    def _sorted(self) -> list[tuple[int, int]]:
        # copy() runs without releasing the GIL: safe while the event loop's thread records.
        return sorted(self._counts.copy().items())

    def copy(self) -> LatencyHistogram:
        """An independent copy (consistent enough to read while the original records)."""
        twin = LatencyHistogram()
        twin._counts = self._counts.copy()
        twin.count, twin.total, twin.max = self.count, self.total, self.max
        return twin

    def merge(self, other: LatencyHistogram) -> None:
        """Add `other`'s durations to this one."""
        counts = self._counts
        for index, count in other._sorted():
            counts[index] = counts.get(index, 0) + count
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)


def format_seconds(seconds: float) -> str:
    """A duration for people: ``850µs``, ``12.5ms``, ``3.20s``."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.2f}s"
