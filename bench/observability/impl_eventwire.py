"""The chain on eventwire: in process (``memory://``) or on Redis Streams.

Modes:

- ``off``: a plain bus;
- ``observer``: ``bus.observe(Observer())``, an observer whose hooks do nothing: what the
  observer hooks cost before any observer does work;
- ``record``: ``bus.record(">")``, the test recorder, keeping every event and handling record;
- ``api``: ``EventBus(tracing=True)`` without an SDK: non-recording spans;
- ``sdk``: ``EventBus(tracing=True)`` with the SDK provider installed globally, where
  eventwire's tracing looks it up.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from common import Metrics, expect

from eventwire import Event, EventBus
from eventwire.observe import Observer
from observability.chain import ChainSizes, Tally, time_chains
from observability.otel import Setup

logging.getLogger("eventwire").setLevel(logging.ERROR)

MODES = ("off", "observer", "record", "api", "sdk")


async def run(url: str, mode: str, sizes: ChainSizes, verify: bool) -> Metrics:
    tracing = mode if mode in ("api", "sdk") else "off"
    setup = Setup(tracing, verify=verify)  # type: ignore[arg-type]
    setup.install_globally()
    tally = Tally()
    bus = EventBus(url, tracing=setup.tracing != "off")

    async def on_query(event: Event[Any]) -> None:
        await bus.publish("research.complete", event.payload)

    async def on_research(event: Event[Any]) -> None:
        tally.hit()

    if mode == "observer":
        bus.observe(Observer())
    bus.subscribe("user.query", on_query, name="researcher")
    bus.subscribe("research.complete", on_research, name="reporter")

    async def publish_root(index: int) -> None:
        await bus.publish("user.query", {"n": index})

    async with bus:
        destination = bus.backend
        try:
            if mode == "record":
                async with bus.record(">") as seen:
                    metrics = await time_chains(publish_root, tally, sizes, setup)
                total = sizes.warmup + sizes.roots
                expect("events recorded", len(seen.events), 2 * total)
                expect("handlings recorded", len(seen.handlings), 2 * total)
            else:
                metrics = await time_chains(publish_root, tally, sizes, setup)
        finally:
            if destination is not None:  # a broker: remove this run's streams
                with contextlib.suppress(Exception):
                    await destination.destroy()
    metrics.update(setup.span_metrics(sizes.warmup + sizes.roots))
    if verify:
        metrics["span_names"] = setup.span_names()  # type: ignore[assignment]
    setup.shutdown()
    return metrics
