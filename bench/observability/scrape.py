"""What reading a bus's metrics costs, on an in-process bus with `SUBSCRIPTIONS`
subscriptions that have each handled a few events (so every handling-time histogram has
samples). Kinds:

- ``stats``: ``bus.stats()``;
- ``collect``: `eventwire.prometheus.EventwireCollector.collect()`: eventwire's part of a
  scrape (reading the bus into metric families);
- ``scrape``: ``generate_latest`` of a registry holding that collector: a whole scrape, as
  the HTTP endpoint renders it;
- ``native``: for reference, ``generate_latest`` of prometheus_client's own `Counter`,
  `Gauge` and `Histogram` objects with the same metric names, label sets and buckets,
  updated by the application as it goes: what the same series cost to render without
  eventwire in the way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common import Metrics, Stopwatch, expect
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from eventwire import Event, EventBus
from eventwire.prometheus import _COUNTERS, _GAUGES, _LABELS, DEFAULT_BUCKETS, EventwireCollector

SUBSCRIPTIONS = 1_000
EVENTS_PER_SUBSCRIPTION = 5
KINDS = ("stats", "collect", "scrape", "native")


async def run(kind: str, calls: int) -> Metrics:
    handled = [0]

    async def handler(event: Event[Any]) -> None:
        handled[0] += 1

    bus = EventBus()
    topics = [f"obs.t{k}" for k in range(SUBSCRIPTIONS)]
    for topic in topics:
        bus.subscribe(topic, handler, name=topic)
    async with bus:
        for round_ in range(EVENTS_PER_SUBSCRIPTION):
            for topic in topics:
                await bus.publish(topic, round_)
        await bus.drain()
        expect("events handled", handled[0], SUBSCRIPTIONS * EVENTS_PER_SUBSCRIPTION)
        read: Callable[[], Any]
        if kind == "stats":
            read = bus.stats
            expect("subscriptions in stats()", len(read()), SUBSCRIPTIONS)
        elif kind == "collect":
            collector = EventwireCollector(bus)

            def read() -> list[Any]:
                return list(collector.collect())
        else:
            registry = CollectorRegistry()
            if kind in ("scrape", "native"):
                registry.register(EventwireCollector(bus))
            else:
                native_metrics(registry, topics)

            def read() -> bytes:
                return generate_latest(registry)

        first = read()
        watch = Stopwatch()
        watch.start()
        for _ in range(calls):
            read()
        seconds = watch.stop()
    metrics: Metrics = {"us_per_call": seconds / calls * 1e6, "calls": calls}
    if kind in ("scrape", "native"):
        metrics["bytes"] = len(first)
        metrics["samples"] = sum(
            1 for line in first.decode().splitlines() if line and not line.startswith("#")
        )
    return metrics


def native_metrics(registry: CollectorRegistry, topics: list[str]) -> None:
    """prometheus_client's own metrics for the same series as `EventwireCollector`'s, each
    handling-time histogram fed `EVENTS_PER_SUBSCRIPTION` samples."""
    counters = [Counter(name, doc, _LABELS, registry=registry) for name, doc, _ in _COUNTERS]
    gauges = [Gauge(name, doc, _LABELS, registry=registry) for name, doc, _ in _GAUGES]
    histogram = Histogram(
        "eventwire_handling_seconds",
        "handling time",
        _LABELS,
        buckets=DEFAULT_BUCKETS,
        registry=registry,
    )
    for topic in topics:
        labels = (topic, topic, "")
        for counter in counters:
            counter.labels(*labels).inc(0)
        for gauge in gauges:
            gauge.labels(*labels).set(0)
        child = histogram.labels(*labels)
        for _ in range(EVENTS_PER_SUBSCRIPTION):
            child.observe(0.00002)
