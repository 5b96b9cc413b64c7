"""The workloads on pyee's `AsyncIOEventEmitter`.

`emit()` calls each listener at once; a coroutine listener becomes its own task
(`asyncio.ensure_future`), so every delivery is a task, with no queue, no bound and no
ordering between deliveries to one listener. `wait_for_complete()` waits for those tasks.
"""

from __future__ import annotations

import asyncio
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
from pyee.asyncio import AsyncIOEventEmitter


async def w1(sizes: Sizes) -> Metrics:
    events = sizes.w1_events
    counts = [0] * W1_SUBSCRIBERS
    emitter = AsyncIOEventEmitter()
    for index in range(W1_SUBSCRIBERS):
        emitter.on("w1.topic", counting_handler(counts, index))
    watch = Stopwatch()
    watch.start()
    for i in range(events):
        emitter.emit("w1.topic", i)
    await emitter.wait_for_complete()
    seconds = watch.stop()
    return w1_rate(counts, events, seconds)


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
    emitter.on("w3.topic", slow_handler)
    emitter.on("w3.topic", ticking_handler(fast))
    emitter.on("w3.topic", ticking_handler(fast))  # a second function: pyee keeps one per function

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
        emitter.on(topic, counting_handler(counts, index))
    watch = Stopwatch()
    watch.start()
    for i in range(sizes.w4_events):
        emitter.emit(topics[i % len(topics)], i)
    await emitter.wait_for_complete()
    seconds = watch.stop()
    return w4_rate(sum(counts), sizes.w4_events, seconds)


async def mem(sizes: Sizes) -> Metrics:
    """Every emit makes a task at once; a delivery waiting to run is that task."""
    events = sizes.mem_events
    blocked = asyncio.Event()
    payload = {"same": "object every time"}
    emitter = AsyncIOEventEmitter()
    emitter.on("mem.topic", blocking_handler(blocked))

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
