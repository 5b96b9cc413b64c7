"""A process stopped while its handler runs, past the event's lease: the broker gives the
event to another process meanwhile, and the first one's acknowledgement, once it runs again,
must not finish the event there (the other process may still fail it)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from eventwire import Event, EventBus
from eventwire.backends import open_backend
from eventwire.backends.base import ConsumerSpec, Delivery
from tests.backends.helpers import fetch_all

# RabbitMQ is not among them: it gives a message to no other process while the one holding it
# keeps its channel, and a stopped process keeps it until its heartbeats are missed.
pytestmark = pytest.mark.parametrize("backend_name", ["sqlite", "redis", "nats"])

LEASE = 1.0


def other_process(url: str, taken: threading.Event, closed: threading.Event) -> list[int]:
    """Another process of the group (its own thread and loop): take the event once the stopped
    one's lease ran out, then fail it (nak) after the stopped one closed; the attempts of
    what comes after that nak."""

    async def run() -> list[int]:
        backend = open_backend(url)
        await backend.connect()
        try:
            consumer = await backend.consumer(
                ConsumerSpec("workers", "lease.t", ack_wait=LEASE, group=True)
            )
            [delivery] = await fetch_all(consumer, 1, timeout=20)
            taken.set()
            assert await asyncio.to_thread(closed.wait, 30)
            await consumer.nak(delivery)
            again: list[Delivery] = await fetch_all(consumer, 1, timeout=10)
            await consumer.ack(again)
            return [delivery.attempt] + [d.attempt for d in again]
        finally:
            await backend.close()

    return asyncio.run(run())


async def test_a_handler_that_outlived_its_lease_does_not_acknowledge_the_event(
    bus_url: str,
) -> None:
    taken, closed = threading.Event(), threading.Event()
    handled: list[int] = []

    async def handle(event: Event[Any]) -> None:
        # Blocks the bus's loop, as SIGSTOP would stop the process: no extends, no fetches,
        # until the other process has the event.
        assert taken.wait(30)  # blocking is the point
        handled.append(event.payload)

    other: asyncio.Future[list[int]] | None = None
    try:
        async with EventBus(bus_url, redeliver_after=LEASE, close_grace=5.0) as bus:
            bus.subscribe("lease.t", handle, group="workers", start="earliest")
            await bus.publish("lease.t", 1)
            other = asyncio.ensure_future(asyncio.to_thread(other_process, bus_url, taken, closed))
            async with asyncio.timeout(30):
                while not handled:  # noqa: ASYNC110 - set by a handler that blocks the loop
                    await asyncio.sleep(0.01)
        # Closing sent every acknowledgement this process had: a late one would be there now.
    finally:
        closed.set()
    assert other is not None
    attempts = await asyncio.wait_for(other, 30)
    assert handled == [1]
    assert attempts == [2, 3], "the event came back after the other process failed it"
