"""Competing groups and subscription identity, the same on every backend: members of one
group in one process keep per-key order, a subscription cannot take another's identity, and
the bus's request replies stay private to their requester."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from eventwire import Event, EventBus, HandlerError, NoReplyError

KEYS = ("k1", "k2", "k3")


async def test_a_key_stays_with_one_member_of_a_group_in_order(bus: EventBus) -> None:
    # Two members of one group in one process, each with room for several events at once:
    # same-key events must still go to one member, one at a time, in publish order.
    handled: list[tuple[str, str, int]] = []
    running: dict[str, int] = {key: 0 for key in KEYS}
    overlaps: list[str] = []

    def member(name: str) -> Any:
        async def handle(event: Event[Any]) -> None:
            key = event.key
            assert key is not None
            running[key] += 1
            if running[key] > 1:
                overlaps.append(key)
            await asyncio.sleep(0.002 * (event.payload % 3))  # uneven handling times
            handled.append((name, key, event.payload))
            running[key] -= 1

        return handle

    bus.subscribe("job.run", member("a"), name="a", group="workers", concurrency=4)
    bus.subscribe("job.run", member("b"), name="b", group="workers", concurrency=4)
    sent = [(KEYS[n % 3], n) for n in range(60)]
    for key, number in sent:
        await bus.publish("job.run", number, key=key)
    await bus.drain(timeout=30)

    assert not overlaps, f"same-key events ran at once in the group: {overlaps}"
    for key in KEYS:
        order = [number for _, k, number in handled if k == key]
        assert order == [number for k, number in sent if k == key], f"key {key} out of order"
        members = {name for name, k, _ in handled if k == key}
        assert len(members) == 1, f"key {key} went to {members}"


async def test_a_name_that_is_another_subscriptions_group_is_refused(bus: EventBus) -> None:
    async def handle(event: Event[Any]) -> None:
        return None

    bus.subscribe("a.*", handle, name="analytics-1", group="analytics")
    with pytest.raises(ValueError, match="group of subscription 'analytics-1'"):
        bus.subscribe("a.*", handle, name="analytics")
    bus.subscribe("b.*", handle, name="billing")
    with pytest.raises(ValueError, match="name of subscription 'billing'"):
        bus.subscribe("b.*", handle, name="billing-2", group="billing")
    # Nothing was added by the refused calls, and members of one group are welcome.
    assert sorted(bus.subscriptions) == ["analytics-1", "billing"]
    bus.subscribe("a.*", handle, name="analytics-2", group="analytics")


async def test_a_failed_request_names_the_group_member_that_failed(bus: EventBus) -> None:
    async def broken(event: Event[Any]) -> None:
        raise RuntimeError("no capacity")

    bus.subscribe("quote.ask", broken, name="pricer-1", group="pricers")
    with pytest.raises(HandlerError) as failure:
        await bus.request("quote.ask", {"item": 1}, timeout=10)
    assert failure.value.subscription == "pricer-1"


async def test_reply_traffic_is_not_seen_by_bus_topic_subscribers(bus: EventBus) -> None:
    seen: list[str] = []

    async def watch(event: Event[Any]) -> None:
        seen.append(event.topic)

    async def answer(event: Event[Any]) -> int:
        return int(event.payload) * 2

    bus.subscribe("_bus.>", watch, name="watcher")
    bus.subscribe("math.double", answer, name="doubler")
    assert await bus.request("math.double", 21, timeout=10) == 42
    await bus.publish("_bus.note", "visible")
    await bus.drain(timeout=10)
    assert "_bus.note" in seen, "the watcher works"
    assert not [topic for topic in seen if topic.startswith("_bus.reply.")]


async def test_drain_and_request_do_not_wait_for_a_subscription_nobody_runs(
    bus: EventBus,
) -> None:
    # A subscription unsubscribed here (and run by no other process) keeps its backlog on a
    # broker, for the next process to run it; drain() and request() do not wait for it.
    async def handle(event: Event[Any]) -> str:
        return "answer"

    gone = bus.subscribe("orders.*", handle, name="left-behind")
    await bus.publish("orders.new", 1)
    await bus.drain(timeout=15)
    await gone.unsubscribe()
    await bus.publish("orders.new", 2)
    await bus.drain(timeout=5)  # before, a broker's drain waited for it until the timeout
    with pytest.raises(NoReplyError):
        await asyncio.wait_for(bus.request("orders.new", 3, timeout=30), 5)
    if bus.capabilities.durable:
        [kept] = [s for s in await bus.backend.subscriptions() if s.name == "left-behind"]
        assert kept.processes == 0
        assert kept.outstanding >= 1, "its backlog stays for the next process to run it"
