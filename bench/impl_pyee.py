"""The workloads on pyee's `AsyncIOEventEmitter`.

`emit()` calls each listener at once; a coroutine listener becomes its own task
(`asyncio.ensure_future`), so every delivery is a task, with no queue, no bound and no
ordering between deliveries to one listener. `wait_for_complete()` waits for those tasks.
"""

from __future__ import annotations

import asyncio
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
from pyee.asyncio import AsyncIOEventEmitter

Listener = Callable[[Any], Awaitable[None]]


def counting_listener(counts: list[int], index: int) -> Listener:
    async def listener(payload: Any) -> None:
        counts[index] += 1

    return listener


async def w1(sizes: Sizes) -> Metrics:
    events = sizes.w1_events
    counts = [0, 0, 0]
    emitter = AsyncIOEventEmitter()
    for index in range(3):
        emitter.on("w1.topic", counting_listener(counts, index))
    watch = Stopwatch()
    watch.start()
    for i in range(events):
        emitter.emit("w1.topic", i)
    await emitter.wait_for_complete()
    seconds = watch.stop()
    expect("W1 deliveries per listener", counts, [events] * 3)
    return rate(3 * events, seconds)


async def w2(sizes: Sizes) -> Metrics:
    probe = Probe()
    emitter = AsyncIOEventEmitter()

    @emitter.on("user.query")
    async def on_query(payload: Any) -> None:
        emitter.emit("research.complete", payload)

    @emitter.on("research.complete")
    async def on_research(payload: Any) -> None:
        probe.hit()

    async def start_chain(index: int) -> None:
        emitter.emit("user.query", index)

    result = await time_chains(start_chain, probe, sizes.w2_chains)
    await emitter.wait_for_complete()
    return result


async def w3(sizes: Sizes) -> Metrics:
    events = sizes.w3_events
    fast = Countdown(2 * events)
    emitter = AsyncIOEventEmitter()

    async def slow_listener(payload: Any) -> None:
        await asyncio.sleep(SLOW_HANDLER_SECONDS)

    async def fast_listener(payload: Any) -> None:
        fast.tick()

    async def fast_listener_2(payload: Any) -> None:
        fast.tick()

    emitter.on("w3.topic", slow_listener)
    emitter.on("w3.topic", fast_listener)
    emitter.on("w3.topic", fast_listener_2)  # pyee keeps one entry per function

    async def publish(index: int) -> None:
        emitter.emit("w3.topic", index)

    result = await time_beside_slow(publish, events, fast)
    await emitter.wait_for_complete()  # the slow deliveries run concurrently: ~10 ms left
    return result


async def w4(sizes: Sizes) -> Metrics:
    topics = [f"w4.t{k}" for k in range(sizes.w4_topics)]
    counts = [0] * len(topics)
    emitter = AsyncIOEventEmitter()
    for index, topic in enumerate(topics):
        emitter.on(topic, counting_listener(counts, index))
    watch = Stopwatch()
    watch.start()
    for i in range(sizes.w4_events):
        emitter.emit(topics[i % len(topics)], i)
    await emitter.wait_for_complete()
    seconds = watch.stop()
    expect("W4 deliveries", sum(counts), sizes.w4_events)
    return rate(sizes.w4_events, seconds)


async def mem(sizes: Sizes) -> Metrics:
    """Every emit makes a task at once; a delivery waiting to run is that task."""
    events = sizes.mem_events
    gate = asyncio.Event()
    blocked = asyncio.Event()
    payload = {"same": "object every time"}
    emitter = AsyncIOEventEmitter()

    @emitter.on("mem.topic")
    async def listener(payload: Any) -> None:
        blocked.set()
        await gate.wait()

    async def fill() -> None:
        for _ in range(events):
            emitter.emit("mem.topic", payload)  # no await in between: none of them starts

    emitter.emit("mem.topic", payload)
    await blocked.wait()
    tasks_before = len(asyncio.all_tasks())
    try:
        return await traced_bytes_per_event(
            fill, events, lambda: len(asyncio.all_tasks()) - tasks_before
        )
    finally:
        emitter.cancel()
