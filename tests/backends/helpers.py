"""What the backend tests (redis, nats, amqp) share: messages easy to check, fetching until
enough came, the error of connecting where nothing listens, and a bus that collects what one
subscription handles."""

from __future__ import annotations

import time
from typing import Any

import pytest

from eventwire import Event, EventBus
from eventwire.backends.base import Backend, BackendConnectionError, Consumer, Delivery, Message


def messages(*specs: tuple[str, str]) -> list[Message]:
    """Messages from `(id, topic)` pairs, whose body is their id, so deliveries are easy to
    check."""
    return [Message(event_id, topic, None, event_id.encode()) for event_id, topic in specs]


def messages_on(topic: str, *ids: str) -> list[Message]:
    """`messages` all on one topic."""
    return messages(*[(event_id, topic) for event_id in ids])


def bodies(deliveries: list[Delivery]) -> list[str]:
    return [d.body.decode() for d in deliveries]


async def fetch_all(consumer: Consumer, count: int, timeout: float = 5.0) -> list[Delivery]:
    """Fetch until `count` deliveries came (or fail after `timeout`), without acking them."""
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {bodies(got)} of {count} came"
        got += await consumer.fetch(count - len(got), 0.5)
    return got


async def connect_error(backend: Backend) -> str:
    """Connect where it cannot: the message of the `BackendConnectionError`, which must come
    within 6 seconds."""
    started = time.monotonic()
    with pytest.raises(BackendConnectionError) as raised:
        await backend.connect()
    assert time.monotonic() - started < 6
    return str(raised.value)


def collecting_bus(url: str, pattern: str, name: str, **options: Any) -> tuple[EventBus, list[Any]]:
    """A bus (not started) whose subscription `name` to `pattern` appends each payload it
    handles to the list returned beside it."""
    bus, handled = EventBus(url), []

    async def collect(event: Event[Any]) -> None:
        handled.append(event.payload)

    bus.subscribe(pattern, collect, name=name, **options)
    return bus, handled
