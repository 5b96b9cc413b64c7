"""Prometheus export of a bus's counters and handling-time histograms.

Needs ``pip install 'eventwire[prometheus]'``. `EventwireCollector` reads the bus at scrape
time only, so handling events costs nothing more than without it; `serve_metrics` serves it
over HTTP for Prometheus to scrape::

    from eventwire.prometheus import serve_metrics

    server = serve_metrics(bus, 9464)  # http://127.0.0.1:9464/metrics
    ...
    server.close()

Handling times come from each subscription's `LatencyHistogram` (log-spaced buckets 3 to 6%
wide) and are reported in the fixed, conventional buckets of `DEFAULT_BUCKETS`: every
log-spaced bucket is counted under the first bound at or above its own upper bound. So
``le="0.1"`` counts events that took at most 0.1 s, and may leave out a few that took just
under it (up to 6.25% below the bound); counts never flatter the handlers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

try:
    from prometheus_client import start_http_server
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError as missing:  # pragma: no cover - depends on the environment
    raise ImportError(
        "eventwire.prometheus needs the prometheus-client package: "
        "pip install 'eventwire[prometheus]'"
    ) from missing

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from eventwire.bus import EventBus
    from eventwire.metrics import LatencyHistogram
    from eventwire.subscription import Subscription, SubscriptionStats

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
"""Upper bounds (seconds) of the ``eventwire_handling_seconds`` buckets, ``+Inf`` aside:
from 0.1 ms (in-process handlers) to 5 minutes (model calls)."""

_LABELS = ("subscription", "pattern", "group")

# name (without _total), help, SubscriptionStats field
_COUNTERS = (
    (
        "eventwire_events_handled",
        "Events a subscription's handler finished successfully.",
        "handled",
    ),
    (
        "eventwire_handler_failures",
        "Handler attempts that raised (each try counts; retried ones too).",
        "failed",
    ),
    ("eventwire_retries", "Handler attempts that were retried after a failure.", "retried"),
    (
        "eventwire_dead_letters",
        "Events given up on and sent to the dead-letter topic.",
        "dead_lettered",
    ),
    (
        "eventwire_events_dropped",
        "Events dropped because the subscription's inbox was full.",
        "dropped",
    ),
)
_GAUGES = (
    (
        "eventwire_events_in_flight",
        "Events a subscription's handlers are working on now.",
        "in_flight",
    ),
    (
        "eventwire_inbox_depth",
        "Events waiting in a subscription's inbox in this process.",
        "queued",
    ),
)


def histogram_buckets(
    histogram: LatencyHistogram, bounds: Sequence[float] = DEFAULT_BUCKETS
) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs of `histogram` at `bounds`, ``+Inf`` last, in
    Prometheus form (see the module docstring for the rounding)."""
    pairs = histogram.buckets()  # cumulative, ascending upper bounds
    result: list[tuple[str, float]] = []
    index, seen = 0, 0
    for bound in bounds:
        while index < len(pairs) and pairs[index][0] <= bound:
            seen = pairs[index][1]
            index += 1
        result.append((_float_label(bound), float(seen)))
    result.append(("+Inf", float(pairs[-1][1] if pairs else 0)))
    return result


def _float_label(value: float) -> str:
    # Prometheus client libraries print bounds as Go/Python floats: 0.1, 1.0, 300.0.
    return repr(float(value))


class EventwireCollector(Collector):
    """A Prometheus collector of one bus's subscriptions, read at scrape time.

    Metrics (labels ``subscription``, ``pattern``, ``group`` — empty when the subscription has
    no group): ``eventwire_events_handled_total``, ``eventwire_handler_failures_total``,
    ``eventwire_retries_total``, ``eventwire_dead_letters_total``,
    ``eventwire_events_dropped_total``, ``eventwire_events_in_flight``,
    ``eventwire_inbox_depth``, the ``eventwire_handling_seconds`` histogram; and
    ``eventwire_info{backend, namespace, version}``. The bus's own request-reply
    subscriptions (``_bus.``) are left out: their names are unique per process.

    Register it on a `prometheus_client` registry: ``REGISTRY.register(EventwireCollector(bus))``.
    Scrapes may come from another thread (the HTTP server's): the collector only reads.
    """

    def __init__(self, bus: EventBus, *, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        ordered = sorted(float(b) for b in buckets)
        if not ordered or ordered[0] <= 0 or len(set(ordered)) != len(ordered):
            raise ValueError(
                f"buckets must be distinct positive upper bounds in seconds, got {buckets!r}"
            )
        self.bus = bus
        self.buckets: tuple[float, ...] = tuple(ordered)

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        # One C-level copy of the live mapping, so that a subscription added meanwhile by the
        # event loop's thread cannot break the iteration.
        subscriptions = [
            s for s in list(self.bus.subscriptions.values()) if not s.name.startswith("_bus.")
        ]
        return list(self._families(subscriptions))

    def _families(self, subscriptions: Sequence[Subscription] = ()) -> Iterator[Metric]:
        info = InfoMetricFamily("eventwire", "The bus this process runs.")
        backend = self.bus.backend
        info.add_metric(
            [],
            {
                "backend": backend.scheme,
                "namespace": backend.namespace,
                "version": _version(),
            },
        )
        yield info
        stats = [(s.stats, s.histogram) for s in subscriptions]
        for name, documentation, attribute in _COUNTERS:
            counter = CounterMetricFamily(name, documentation, labels=_LABELS)
            for snapshot, _ in stats:
                counter.add_metric(_label_values(snapshot), getattr(snapshot, attribute))
            yield counter
        for name, documentation, attribute in _GAUGES:
            gauge = GaugeMetricFamily(name, documentation, labels=_LABELS)
            for snapshot, _ in stats:
                gauge.add_metric(_label_values(snapshot), getattr(snapshot, attribute))
            yield gauge
        histogram = HistogramMetricFamily(
            "eventwire_handling_seconds",
            "Time each finished event took to handle, retries and backoff included.",
            labels=_LABELS,
        )
        for snapshot, latencies in stats:
            histogram.add_metric(
                _label_values(snapshot),
                histogram_buckets(latencies, self.buckets),
                latencies.total,
            )
        yield histogram


def _label_values(stats: SubscriptionStats) -> list[str]:
    return [stats.name, stats.pattern, stats.group or ""]


def _version() -> str:
    from eventwire import __version__

    return __version__


@dataclass
class MetricsServer:
    """A running metrics endpoint (see `serve_metrics`); `close()` stops it."""

    addr: str
    port: int
    registry: CollectorRegistry
    _server: WSGIServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        """Where Prometheus scrapes, e.g. ``http://127.0.0.1:9464/metrics``."""
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and free the port. Blocks up to about half a second."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(
    bus: EventBus,
    port: int,
    addr: str = "127.0.0.1",
    *,
    buckets: Sequence[float] = DEFAULT_BUCKETS,
) -> MetricsServer:
    """Serve `bus`'s metrics (plus the process's CPU, memory and garbage-collector ones) at
    ``http://addr:port/metrics`` from a background thread; port 0 takes a free one (see
    ``.port``). Raises `OSError` if the port is taken."""
    from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

    registry = CollectorRegistry(auto_describe=True)
    registry.register(EventwireCollector(bus, buckets=buckets))
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(addr, int(server.server_address[1]), registry, server, thread)


__all__ = [
    "DEFAULT_BUCKETS",
    "EventwireCollector",
    "MetricsServer",
    "histogram_buckets",
    "serve_metrics",
]
