"""Guarantees a reviewer found untested: each test fails if its guarantee is broken.

Every test names, in its docstring, the change to the library it is meant to catch.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from typing import Any

import pytest
from pydantic import BaseModel

from eventwire import Agent, BusClosedError, Event, EventBus, Retry, Subscription, on

from .conftest import wait_until


class Order(BaseModel):
    """A payload type; at module level so that string annotations resolve."""

    id: int


async def _fill(bus: EventBus, sub: Subscription, topic: str, *payloads: Any) -> None:
    """Publish `payloads` to `topic` so that `sub` (max_pending=1, gated handler) ends up with
    the first in flight and the second queued: its inbox is full."""
    first, second = payloads
    await asyncio.wait_for(bus.publish(topic, first), timeout=1)
    await wait_until(lambda: sub.stats.in_flight == 1)
    await asyncio.wait_for(bus.publish(topic, second), timeout=1)
    assert sub.stats.queued == 1


# -- back-pressure ------------------------------------------------------------------------


async def test_blocked_publishers_are_let_in_first_come_first_served(bus: EventBus) -> None:
    """Catches: admitting blocked publishers LIFO (or in any order but arrival)."""
    gate = asyncio.Event()
    seen: list[str] = []

    async def gated(event: Event[str]) -> None:
        await gate.wait()
        seen.append(event.payload)

    sub = bus.subscribe("t", gated, name="gated", max_pending=1)
    await _fill(bus, sub, "t", "first", "fill")
    blocked: list[asyncio.Task[Event[Any]]] = []
    for n, name in enumerate("ABC"):
        blocked.append(asyncio.create_task(bus.publish("t", name)))
        # Each publisher is waiting for room before the next one starts.
        await wait_until(lambda n=n: sub.stats.queued == 2 + n)
    assert not any(task.done() for task in blocked)
    gate.set()
    await asyncio.wait_for(asyncio.gather(*blocked), timeout=2)
    await bus.drain(timeout=2)
    assert seen == ["first", "fill", "A", "B", "C"]


async def test_group_skips_a_member_whose_inbox_is_full(bus: EventBus) -> None:
    """Catches: a group picking members by plain round robin, blind to a full inbox (the
    publish would block on the stuck member, and half the events would go to it)."""
    gate = asyncio.Event()
    stuck_seen: list[int] = []
    free_seen: list[int] = []

    async def stuck(event: Event[int]) -> None:
        await gate.wait()
        stuck_seen.append(event.payload)

    async def free(event: Event[int]) -> None:
        free_seen.append(event.payload)

    stuck_sub = bus.subscribe("jobs", stuck, name="stuck", group="workers", max_pending=1)
    await _fill(bus, stuck_sub, "jobs", 0, 1)  # the only member yet: both go to it
    bus.subscribe("jobs", free, name="free", group="workers")
    for n in range(2, 22):
        await asyncio.wait_for(bus.publish("jobs", n), timeout=1)  # never blocks
    await wait_until(lambda: len(free_seen) == 20)
    assert free_seen == list(range(2, 22))
    stats = stuck_sub.stats
    assert (stats.in_flight, stats.queued, stats.handled) == (1, 1, 0)
    gate.set()
    await bus.drain(timeout=2)
    assert stuck_seen == [0, 1]


async def test_group_routes_each_key_to_one_member_in_order(bus: EventBus) -> None:
    """Catches: keyed events in a group routed round robin (or by load), which splits a key
    over members and loses its order; and routing every key to the same member."""
    rng = random.Random(11)
    handled: list[tuple[str, str, int]] = []

    def member(name: str) -> Any:
        async def handle(event: Event[int]) -> None:
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)
            assert event.key is not None
            handled.append((name, event.key, event.payload))

        return handle

    for name in ("w1", "w2", "w3"):
        bus.subscribe("jobs", member(name), name=name, group="workers")
    expected: dict[str, list[int]] = {}
    for n in range(600):
        key = f"k{rng.randrange(50)}"
        expected.setdefault(key, []).append(n)
        await bus.publish("jobs", n, key=key)
    await bus.drain(timeout=5)

    members_of: dict[str, set[str]] = {}
    order_of: dict[str, list[int]] = {}
    for name, key, payload in handled:
        members_of.setdefault(key, set()).add(name)
        order_of.setdefault(key, []).append(payload)
    assert order_of == expected  # each event once, each key in publish order
    assert all(len(names) == 1 for names in members_of.values()), members_of
    # 50 keys over 3 members: all on one member would be a ~1e-23 chance with hash routing.
    assert len({name for name, _, _ in handled}) > 1


# -- agents -------------------------------------------------------------------------------


async def test_agent_request_sets_source_to_the_agent_name(bus: EventBus) -> None:
    """Catches: `Agent.request` building its request event without the agent as source."""
    sources: list[str | None] = []

    async def answer(event: Event[int]) -> int:
        sources.append(event.source)
        return event.payload + 1

    bus.subscribe("math.inc", answer, name="inc")
    caller = bus.register(Agent(name="caller"))
    assert await caller.request("math.inc", 41, timeout=2) == 42
    assert sources == ["caller"]


async def test_on_forwards_group_so_agents_compete(bus: EventBus) -> None:
    """Catches: `@on` dropping `group=`, which makes every agent handle every event."""
    handled: list[tuple[str, int]] = []

    class Worker(Agent):
        @on("jobs", group="workers")
        async def work(self, event: Event[int]) -> None:
            handled.append((self.name, event.payload))
            await asyncio.sleep(0)

    bus.register(Worker("a"))
    bus.register(Worker("b"))
    assert bus.subscriptions["a.work"].group == "workers"
    assert bus.subscriptions["b.work"].group == "workers"
    for n in range(50):
        await bus.publish("jobs", n)
    await bus.drain(timeout=2)
    assert sorted(payload for _, payload in handled) == list(range(50))  # each once


# -- failures -----------------------------------------------------------------------------


async def test_timeout_applies_to_plain_function_handlers(bus: EventBus) -> None:
    """Catches: `timeout=` applied only to async handlers (the dead letter would not come
    until the thread was released)."""
    release = threading.Event()
    started = threading.Event()

    def blocking(event: Event[Any]) -> None:
        started.set()
        release.wait(10)

    sub = bus.subscribe("slow", blocking, name="blocking", timeout=0.05)
    try:
        async with bus.record() as seen:
            await bus.publish("slow", 1)
            [gave_up] = await seen.wait_handled(sub, outcome="dead_lettered", timeout=2)
        assert started.is_set()
        assert not release.is_set()  # dead-lettered while the thread still blocked
        assert "timeout" in str(gave_up.error)
        assert (sub.stats.handled, sub.stats.dead_lettered) == (0, 1)
    finally:
        release.set()
    await bus.drain(timeout=2)


async def test_close_fails_pending_requests_and_blocked_publishers() -> None:
    """Catches: close() leaving a request's future, or a publisher waiting for room, unresolved
    (they would hang until their own timeouts instead of learning the bus closed)."""
    bus = EventBus(close_grace=2.0)
    gate = asyncio.Event()  # never set: both handlers stay stuck until close cancels them

    async def stuck(event: Event[Any]) -> None:
        await gate.wait()

    ask = bus.subscribe("ask", stuck, name="ask")
    full = bus.subscribe("full", stuck, name="full", max_pending=1)
    await bus.start()
    try:
        request = asyncio.create_task(bus.request("ask", 1, timeout=30))
        await wait_until(lambda: ask.stats.in_flight == 1)
        await _fill(bus, full, "full", 0, 1)
        blocked = asyncio.create_task(bus.publish("full", 2))
        await wait_until(lambda: full.stats.queued == 2)  # one queued, one waiting for room
        closing = asyncio.create_task(bus.close(grace=0.05))
        with pytest.raises(BusClosedError):
            await asyncio.wait_for(request, timeout=2)
        with pytest.raises(BusClosedError):
            await asyncio.wait_for(blocked, timeout=2)
        report = await asyncio.wait_for(closing, timeout=3)
        assert not report.clean
    finally:
        await asyncio.wait_for(bus.close(), timeout=3)


@pytest.mark.parametrize(
    ("concurrency", "key"),
    [(1, None), (2, "k")],
    ids=["queued-in-inbox", "parked-behind-busy-key"],
)
async def test_unsubscribe_without_drain_discards_and_counts(
    bus: EventBus, concurrency: int, key: str | None
) -> None:
    """Catches: drain=False handling queued events anyway, not counting them as dropped, or
    not settling them (drain() would hang)."""
    gate = asyncio.Event()
    seen: list[int] = []

    async def gated(event: Event[int]) -> None:
        await gate.wait()
        seen.append(event.payload)

    sub = bus.subscribe("t", gated, name="gated", concurrency=concurrency)
    await bus.publish("t", 0, key=key)
    await wait_until(lambda: sub.stats.in_flight == 1)
    for n in range(1, 5):
        await bus.publish("t", n, key=key)
    await wait_until(lambda: sub.stats.queued == 4)
    unsubscribing = asyncio.create_task(sub.unsubscribe(drain=False))
    await wait_until(lambda: sub.stats.dropped == 4)
    assert sub.stats.queued == 0
    gate.set()
    await asyncio.wait_for(unsubscribing, timeout=2)
    await bus.drain(timeout=2)
    assert seen == [0]  # only the event already in flight
    assert sub.stats.dropped == 4
    assert sub.stats.handled == 1


async def test_typed_payload_is_converted_on_retries_too(bus: EventBus) -> None:
    """Catches: a retry calling the handler with the raw event instead of the converted one."""
    payloads: list[Any] = []

    async def handle(event: Event[Order]) -> None:
        payloads.append(event.payload)
        if len(payloads) == 1:
            raise ConnectionError("first attempt fails")

    sub = bus.subscribe("orders", handle, name="orders", retry=Retry(attempts=2, backoff=0))
    await bus.publish("orders", {"id": 7})
    await bus.drain(timeout=2)
    assert [type(p) for p in payloads] == [Order, Order]
    assert payloads[1] == Order(id=7)
    assert (sub.stats.handled, sub.stats.retried, sub.stats.dead_lettered) == (1, 1, 0)


async def test_drop_oldest_logs_a_warning(bus: EventBus, caplog: pytest.LogCaptureFixture) -> None:
    """Catches: dropping events silently (or at a level below WARNING)."""
    caplog.set_level(logging.WARNING, logger="eventwire")
    gate = asyncio.Event()

    async def gated(event: Event[int]) -> None:
        await gate.wait()

    sub = bus.subscribe("t", gated, name="lossy", max_pending=1, overflow="drop_oldest")
    await _fill(bus, sub, "t", 0, 1)
    assert not [r for r in caplog.records if r.name == "eventwire"]
    await asyncio.wait_for(bus.publish("t", 2), timeout=1)  # drops 1
    assert sub.stats.dropped == 1
    warnings = [r for r in caplog.records if r.name == "eventwire" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "lossy" in message
    assert "dropped" in message
    gate.set()
    await bus.drain(timeout=2)


# -- causation ----------------------------------------------------------------------------


async def test_publishing_an_event_object_from_a_handler_fills_source_and_cause(
    bus: EventBus,
) -> None:
    """Catches: publish(Event(...)) inside a handler skipping the source / causation fill-in
    that publish(topic, payload) does."""
    children: list[Event[Any]] = []

    async def relay(event: Event[Any]) -> None:
        await bus.publish(Event("child", event.payload))

    async def child(event: Event[Any]) -> None:
        children.append(event)

    bus.subscribe("parent", relay, name="relay")
    bus.subscribe("child", child, name="child")
    parent = await bus.publish("parent", "x")
    await bus.drain(timeout=2)
    [got] = children
    assert got.payload == "x"
    assert got.source == "relay"
    assert got.causation_id == parent.id
    assert got.correlation_id == parent.correlation_id


# -- order and draining ------------------------------------------------------------------


async def test_order_holds_across_retries(bus: EventBus) -> None:
    """Catches: retrying in the background (or re-queueing at the back) while later events
    go ahead of the failed one."""
    attempts: dict[int, int] = {}
    handled: list[int] = []

    async def handler(event: Event[int]) -> None:
        attempts[event.payload] = attempts.get(event.payload, 0) + 1
        if event.payload == 0 and attempts[0] == 1:
            raise ConnectionError("first attempt of event 0 fails")
        handled.append(event.payload)

    sub = bus.subscribe("t", handler, name="h", retry=Retry(attempts=3, backoff=0.01))
    for n in range(5):
        await bus.publish("t", n)
    await bus.drain(timeout=2)
    assert handled == [0, 1, 2, 3, 4]
    assert attempts == {0: 2, 1: 1, 2: 1, 3: 1, 4: 1}
    assert (sub.stats.handled, sub.stats.retried) == (5, 1)


async def test_drain_waits_for_a_child_publish_blocked_on_a_full_inbox(bus: EventBus) -> None:
    """Catches: drain() not counting a follow-up event until it is queued, or counting it with
    the drain() that began after its cause instead of with its cause (either way drain() would
    return while the child still waited for room, or before it was handled)."""
    a_gate = asyncio.Event()
    gate = asyncio.Event()
    b_seen: list[str] = []

    async def a_handler(event: Event[str]) -> None:
        await a_gate.wait()
        await bus.publish("b", f"child-of-{event.payload}")

    async def b_handler(event: Event[str]) -> None:
        await gate.wait()
        for _ in range(3):  # give drain() every chance to return too early
            await asyncio.sleep(0)
        b_seen.append(event.payload)

    a_sub = bus.subscribe("a", a_handler, name="a")
    b_sub = bus.subscribe("b", b_handler, name="b", max_pending=1)
    await _fill(bus, b_sub, "b", "b0", "b1")
    await bus.publish("a", "a0")
    await wait_until(lambda: a_sub.stats.in_flight == 1)
    draining = asyncio.create_task(bus.drain(timeout=5))
    # Callbacks run in the order they were scheduled: drain() starts before the handler of
    # "a" is let go, so the child is published (and blocks) while that drain() waits.
    asyncio.get_running_loop().call_soon(a_gate.set)
    await wait_until(lambda: b_sub.stats.queued == 2)  # the child waits for room
    with pytest.raises(TimeoutError):
        await bus.drain(timeout=0.2)
    assert b_sub.stats.queued == 2  # still blocked: drain() was right to wait
    assert not draining.done()
    gate.set()
    await asyncio.wait_for(draining, timeout=5)
    assert b_seen == ["b0", "b1", "child-of-a0"]  # no waiting: drain() already did
    assert a_sub.stats.handled == 1
    await bus.drain(timeout=2)
