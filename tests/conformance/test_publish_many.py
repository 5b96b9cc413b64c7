"""`publish_many`: several events in one call, in order, on every backend."""

from __future__ import annotations

import math
from typing import Any

import pytest

from eventwire import Event, EventBus
from tests.conftest import wait_until


async def test_publish_many_delivers_in_order_and_returns_the_events(bus: EventBus) -> None:
    seen: list[Any] = []
    bus.subscribe("batch.*", lambda e: seen.append((e.topic, e.payload)), name="reader")
    await bus.publish("batch.a", -1)  # its subscription exists before the batch
    own = Event("batch.b", "an event")
    published = await bus.publish_many([("batch.a", n) for n in range(300)] + [own])
    assert [e.payload for e in published] == [*range(300), "an event"]
    assert published[-1].id == own.id
    await wait_until(lambda: len(seen) == 302, timeout=10)
    assert seen == [("batch.a", -1), *(("batch.a", n) for n in range(300)), ("batch.b", "an event")]


async def test_publish_many_from_a_handler_links_every_event_to_its_cause(bus: EventBus) -> None:
    children: list[Event[Any]] = []

    async def fan_out(event: Event[Any]) -> None:
        await bus.publish_many([("work.item", n) for n in range(3)])

    bus.subscribe("work.start", fan_out, name="fan-out")
    bus.subscribe("work.item", children.append, name="worker")
    cause = await bus.publish("work.start", None)
    await wait_until(lambda: len(children) == 3, timeout=10)
    assert {c.causation_id for c in children} == {cause.id}
    assert {c.correlation_id for c in children} == {cause.correlation_id}
    assert {c.source for c in children} == {"fan-out"}


async def test_a_bad_event_in_a_batch_is_a_clear_error(bus: EventBus) -> None:
    seen: list[Any] = []
    bus.subscribe("good.*", lambda e: seen.append(e.payload), name="reader")
    await bus.publish("good.x", "first")
    with pytest.raises(ValueError, match="bad topic"):
        await bus.publish_many([("good.x", 1), ("bad topic", 2)])
    # Checked before anything is sent, in process as on a broker: none of the batch went out.
    with pytest.raises(TypeError, match="infinite or NaN"):
        await bus.publish_many([("good.x", 2), ("good.x", math.inf)])
    await bus.publish("good.x", "last")
    await wait_until(lambda: bool(seen) and seen[-1] == "last", timeout=10)
    assert seen == ["first", "last"]
