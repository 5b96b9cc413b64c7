"""The workloads on a hand-written baseline: per subscriber one unbounded `asyncio.Queue` and
one worker task; publish is `put_nowait` into the queue of every subscriber of the topic.

It has none of eventwire's features (patterns, bounds, retries, ids, draining chains): it is
the floor cost of isolated asyncio delivery.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from common import (
    W1_SUBSCRIBERS,
    Countdown,
    Handler,
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


class QueueBus:
    """Exact topics; per subscriber an unbounded queue and a worker task."""

    def __init__(self) -> None:
        self._queues: defaultdict[str, list[asyncio.Queue[Any]]] = defaultdict(list)
        self._all: list[asyncio.Queue[Any]] = []
        self._workers: list[asyncio.Task[None]] = []

    def subscribe(self, topic: str, handler: Handler) -> asyncio.Queue[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[topic].append(queue)
        self._all.append(queue)
        self._workers.append(asyncio.create_task(self._work(queue, handler)))
        return queue

    @staticmethod
    async def _work(queue: asyncio.Queue[Any], handler: Handler) -> None:
        while True:
            payload = await queue.get()
            await handler(payload)
            queue.task_done()

    def publish(self, topic: str, payload: Any) -> None:
        for queue in self._queues[topic]:
            queue.put_nowait(payload)

    async def join(self) -> None:
        """Wait until every queued payload has been handled."""
        for queue in self._all:
            await queue.join()

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)


async def w1(sizes: Sizes) -> Metrics:
    events = sizes.w1_events
    counts = [0] * W1_SUBSCRIBERS
    bus = QueueBus()
    for index in range(W1_SUBSCRIBERS):
        bus.subscribe("w1.topic", counting_handler(counts, index))
    watch = Stopwatch()
    await asyncio.sleep(0)  # let the workers start: setup, not timed
    watch.start()
    for i in range(events):
        bus.publish("w1.topic", i)
    await bus.join()
    seconds = watch.stop()
    await bus.close()
    return w1_rate(counts, events, seconds)


async def w2(sizes: Sizes) -> Metrics:
    probe = Probe()
    bus = QueueBus()

    async def on_query(payload: Any) -> None:
        bus.publish("research.complete", payload)

    async def on_research(payload: Any) -> None:
        probe.hit()

    bus.subscribe("user.query", on_query)
    bus.subscribe("research.complete", on_research)

    async def start_chain(index: int) -> None:
        bus.publish("user.query", index)

    try:
        return await time_chains(start_chain, probe, sizes.w2_chains)
    finally:
        await bus.close()


async def w3(sizes: Sizes) -> Metrics:
    events = sizes.w3_events
    fast = Countdown(2 * events)
    bus = QueueBus()
    bus.subscribe("w3.topic", slow_handler)
    bus.subscribe("w3.topic", ticking_handler(fast))
    bus.subscribe("w3.topic", ticking_handler(fast))

    async def publish(index: int) -> None:
        bus.publish("w3.topic", index)

    try:
        return await time_beside_slow(publish, events, fast)
    finally:
        await bus.close()


async def w4(sizes: Sizes) -> Metrics:
    topics = [f"w4.t{k}" for k in range(sizes.w4_topics)]
    counts = [0] * len(topics)
    bus = QueueBus()
    for index, topic in enumerate(topics):
        bus.subscribe(topic, counting_handler(counts, index))
    watch = Stopwatch()
    await asyncio.sleep(0)  # let the workers start: setup, not timed
    watch.start()
    for i in range(sizes.w4_events):
        bus.publish(topics[i % len(topics)], i)
    await bus.join()
    seconds = watch.stop()
    await bus.close()
    return w4_rate(sum(counts), sizes.w4_events, seconds)


async def mem(sizes: Sizes) -> Metrics:
    events = sizes.mem_events
    blocked = asyncio.Event()
    payload = {"same": "object every time"}
    bus = QueueBus()
    queue = bus.subscribe("mem.topic", blocking_handler(blocked))

    async def fill() -> None:
        for _ in range(events):
            bus.publish("mem.topic", payload)

    try:
        bus.publish("mem.topic", payload)
        await blocked.wait()
        return await traced_bytes_per_event(fill, events, queue.qsize)
    finally:
        await bus.close()
