"""The workloads on eventwire: one isolated inbox and worker per subscription."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from common import (
    SLOW_HANDLER_SECONDS,
    Countdown,
    Metrics,
    Probe,
    Sizes,
    Stopwatch,
    expect,
    rate,
    time_beside_slow,
    time_chains,
    traced_bytes_per_event,
)

from eventwire import Event, EventBus

Handler = Callable[[Event[Any]], Awaitable[None]]

# W3 and the memory run close the bus with work left on purpose; its warning is expected.
logging.getLogger("eventwire").setLevel(logging.ERROR)


def counting_handler(counts: list[int], index: int) -> Handler:
    async def handler(event: Event[Any]) -> None:
        counts[index] += 1

    return handler


async def w1(sizes: Sizes) -> Metrics:
    events = sizes.w1_events
    counts = [0, 0, 0]
    bus = EventBus()
    for index in range(3):
        bus.subscribe("w1.topic", counting_handler(counts, index), name=f"w1.sub{index}")
    watch = Stopwatch()
    async with bus:
        await asyncio.sleep(0)  # let the workers start: setup, not timed
        watch.start()
        for i in range(events):
            await bus.publish("w1.topic", i)
        await bus.drain()
        seconds = watch.stop()
    expect("W1 deliveries per subscriber", counts, [events] * 3)
    return rate(3 * events, seconds)


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

    async def slow_handler(event: Event[Any]) -> None:
        await asyncio.sleep(SLOW_HANDLER_SECONDS)

    async def fast_handler(event: Event[Any]) -> None:
        fast.tick()

    bus.subscribe("w3.topic", slow_handler, name="slow")
    bus.subscribe("w3.topic", fast_handler, name="fast1")
    bus.subscribe("w3.topic", fast_handler, name="fast2")

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
    expect("W4 deliveries", sum(counts), sizes.w4_events)
    return rate(sizes.w4_events, seconds)


async def mem(sizes: Sizes) -> Metrics:
    events = sizes.mem_events
    gate = asyncio.Event()
    blocked = asyncio.Event()
    payload = {"same": "object every time"}

    async def handler(event: Event[Any]) -> None:
        blocked.set()
        await gate.wait()

    bus = EventBus()
    subscription = bus.subscribe("mem.topic", handler, name="blocked", max_pending=2 * events)

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
