"""The workloads on eventwire: one isolated inbox and worker per subscription."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from common import (
    W1_SUBSCRIBERS,
    Countdown,
    Metrics,
    Probe,
    Sizes,
    Stopwatch,
    blocking_handler,
    counting_handler,
    slow_handler,
    ticking_handler,
    time_beside_slow,
    time_chains,
    traced_bytes_per_event,
    w1_rate,
    w4_rate,
)

from eventwire import Event, EventBus

# W3 and the memory run close the bus with work left on purpose; its warning is expected.
logging.getLogger("eventwire").setLevel(logging.ERROR)


async def w1(sizes: Sizes) -> Metrics:
    events = sizes.w1_events
    counts = [0] * W1_SUBSCRIBERS
    bus = EventBus()
    for index in range(W1_SUBSCRIBERS):
        bus.subscribe("w1.topic", counting_handler(counts, index), name=f"w1.sub{index}")
    watch = Stopwatch()
    async with bus:
        await asyncio.sleep(0)  # let the workers start: setup, not timed
        watch.start()
        for i in range(events):
            await bus.publish("w1.topic", i)
        await bus.drain()
        seconds = watch.stop()
    return w1_rate(counts, events, seconds)


async def w2(sizes: Sizes) -> Metrics:
    probe = Probe()
    bus = EventBus()

    async def on_query(event: Event[Any]) -> None:
        await bus.publish("research.complete", event.payload)

    async def on_research(event: Event[Any]) -> None:
        probe.hit()

    bus.subscribe("user.query", on_query, name="researcher")
    bus.subscribe("research.complete", on_research, name="reporter")

    async def start_chain(index: int) -> None:
        await bus.publish("user.query", index)

    async with bus:
        return await time_chains(start_chain, probe, sizes.w2_chains)


async def w3(sizes: Sizes) -> Metrics:
    events = sizes.w3_events
    fast = Countdown(2 * events)
    bus = EventBus()
    bus.subscribe("w3.topic", slow_handler, name="slow")
    bus.subscribe("w3.topic", ticking_handler(fast), name="fast1")
    bus.subscribe("w3.topic", ticking_handler(fast), name="fast2")

    async def publish(index: int) -> None:
        await bus.publish("w3.topic", index)

    await bus.start()
    try:
        return await time_beside_slow(publish, events, fast)
    finally:
        await bus.close(grace=0)  # the slow subscriber still has seconds of work queued


async def w4(sizes: Sizes) -> Metrics:
    topics = [f"w4.t{k}" for k in range(sizes.w4_topics)]
    counts = [0] * len(topics)
    bus = EventBus()
    for index, topic in enumerate(topics):
        bus.subscribe(topic, counting_handler(counts, index), name=topic)
    watch = Stopwatch()
    async with bus:
        await asyncio.sleep(0)  # let the workers start: setup, not timed
        watch.start()
        for i in range(sizes.w4_events):
            await bus.publish(topics[i % len(topics)], i)
        await bus.drain()
        seconds = watch.stop()
    return w4_rate(sum(counts), sizes.w4_events, seconds)


async def mem(sizes: Sizes) -> Metrics:
    events = sizes.mem_events
    blocked = asyncio.Event()
    payload = {"same": "object every time"}
    bus = EventBus()
    subscription = bus.subscribe(
        "mem.topic", blocking_handler(blocked), name="blocked", max_pending=2 * events
    )

    async def fill() -> None:
        for _ in range(events):
            await bus.publish("mem.topic", payload)

    await bus.start()
    try:
        await bus.publish("mem.topic", payload)
        await blocked.wait()  # the worker now holds the first event; the rest will queue
        return await traced_bytes_per_event(fill, events, lambda: subscription.stats.queued)
    finally:
        await bus.close(grace=0)
