"""Keys never cost publish order: a ``concurrency=1`` subscription handles events in the order
they were published whatever their keys, and with more concurrency same-key events stay in
order and one at a time. Each test runs on memory, sqlite, redis, nats and amqp, with the first
event still being handled while the rest arrive (what a broker holds back then shows)."""

from __future__ import annotations

import asyncio

from eventwire import Event, EventBus
from tests.conftest import wait_until


async def test_one_at_a_time_keeps_publish_order_whatever_the_keys(bus: EventBus) -> None:
    release = asyncio.Event()
    started: list[int] = []

    async def handle(event: Event[int]) -> None:
        started.append(event.payload)
        if event.payload == 1:
            await release.wait()

    subscription = bus.subscribe("orders.placed", handle)  # concurrency=1
    await subscription.ready()
    await bus.publish("orders.placed", 1, key="k1")
    await wait_until(lambda: started == [1], timeout=10)
    await bus.publish("orders.placed", 2, key="k1")
    await bus.publish("orders.placed", 3)
    await bus.publish("orders.placed", 4, key="k2")
    # Whatever the broker hands over while 1 is being handled is queued behind it: at least
    # two of 2, 3 and 4 (a broker holding 2 back behind 1 queues 3 and 4 first).
    await wait_until(lambda: subscription.stats.queued >= 2, timeout=10)
    release.set()
    await bus.drain(timeout=10)
    assert started == [1, 2, 3, 4]


async def test_same_key_stays_in_order_one_at_a_time_while_other_keys_go_on(
    bus: EventBus,
) -> None:
    release = asyncio.Event()
    running: set[str] = set()
    overlapping: list[int] = []
    finished: list[int] = []

    async def handle(event: Event[int]) -> None:
        key = event.key or f"none-{event.payload}"
        if key in running:
            overlapping.append(event.payload)
        running.add(key)
        if event.payload == 1:
            await release.wait()
        await asyncio.sleep(0)  # a turn for anything that would wrongly run beside it
        running.discard(key)
        finished.append(event.payload)

    subscription = bus.subscribe("orders.placed", handle, concurrency=4)
    await subscription.ready()
    await bus.publish("orders.placed", 1, key="k1")
    await wait_until(lambda: "k1" in running, timeout=10)
    for payload, key in ((2, "k1"), (3, "k2"), (4, "k1"), (5, None), (6, "k2")):
        await bus.publish("orders.placed", payload, key=key)
    # Other keys are not held up by k1's first event, and k1's later ones wait for it.
    await wait_until(lambda: sorted(finished) == [3, 5, 6], timeout=10)
    assert [payload for payload in finished if payload in (3, 6)] == [3, 6]
    release.set()
    await bus.drain(timeout=10)
    assert overlapping == []
    assert [payload for payload in finished if payload in (1, 2, 4)] == [1, 2, 4]
