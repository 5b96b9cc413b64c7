"""A private broker, started on a free port for this test only, is restarted while events are
being published: every event whose `publish` returned is delivered. The shared services are
never touched."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from eventwire import Event, EventBus, PublishTimeoutError
from tests.conftest import wait_until
from tests.services import PrivateServer, private_server


@pytest.fixture(params=["redis", "nats"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PrivateServer]:
    with private_server(str(request.param), tmp_path) as server:
        yield server


async def test_every_returned_publish_is_delivered_across_a_broker_restart(
    broker: PrivateServer,
) -> None:
    seen: set[int] = set()
    returned: list[int] = []
    bus = EventBus(broker.url, publish_timeout=30, redeliver_after=3)

    async def handle(event: Event[int]) -> None:
        seen.add(event.payload)

    bus.subscribe("restart.n", handle, name="survivor")
    async with bus:

        async def publish_all() -> None:
            for n in range(3000):
                try:
                    await bus.publish("restart.n", n)
                except PublishTimeoutError:
                    continue  # not returned: not promised
                returned.append(n)

        publishing = asyncio.create_task(publish_all())
        await wait_until(lambda: len(returned) >= 500, timeout=30)
        await broker.restart()
        await asyncio.wait_for(publishing, timeout=60)
        assert len(returned) == 3000, "publishes during the outage waited and went through"
        await wait_until(lambda: set(returned) <= seen, timeout=60)


@contextlib.asynccontextmanager
async def in_an_outage(
    broker: PrivateServer, publish_timeout: float
) -> AsyncIterator[tuple[EventBus, list[str]]]:
    """A running bus whose subscription got "before", with its broker stopped: the bus and
    the payloads the subscription gets."""
    bus = EventBus(broker.url, publish_timeout=publish_timeout, close_grace=0.5)
    seen: list[str] = []
    bus.subscribe("outage.t", lambda e: seen.append(e.payload), name="patient")
    async with bus:
        await bus.publish("outage.t", "before")
        # Handled before the outage begins (else it may come after "after", redelivered).
        await wait_until(lambda: seen == ["before"], timeout=10)
        await asyncio.to_thread(broker.stop)
        yield bus, seen
    assert seen[0] == "before"


async def test_publish_during_an_outage_waits_then_raises_clearly(broker: PrivateServer) -> None:
    async with in_an_outage(broker, publish_timeout=0.5) as (bus, seen):
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(PublishTimeoutError, match=r"not confirmed stored .* within"):
            await bus.publish("outage.t", "during")
        waited = loop.time() - started
        assert 0.4 <= waited < 5, waited
        await broker.start_async()

        async def publish_until_stored() -> None:
            while True:  # the client reconnects with backoff; each try is bounded
                try:
                    await bus.publish("outage.t", "after")
                    return
                except PublishTimeoutError:
                    continue

        await asyncio.wait_for(publish_until_stored(), timeout=30)
        await wait_until(lambda: "after" in seen, timeout=30)


async def test_each_publish_has_its_own_timeout_during_an_outage(broker: PrivateServer) -> None:
    # First and second are sent while the broker is down; third joins them 5.5 s later. The
    # broker comes back after the first two's timeouts, well before the third's: the third
    # must be stored, not failed with its batch at the first deadline.
    async with in_an_outage(broker, publish_timeout=6) as (bus, seen):
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.create_task(bus.publish("outage.t", "first"))
        await asyncio.sleep(0.1)  # time passing in the outage is the point: no condition
        second = asyncio.create_task(bus.publish("outage.t", "second"))
        await asyncio.sleep(5.5)
        third = asyncio.create_task(bus.publish("outage.t", "third"))
        for early in (first, second):
            with pytest.raises(PublishTimeoutError):
                await early
        assert loop.time() - started < 7.5
        await broker.start_async()
        await asyncio.wait_for(third, timeout=30)  # raised before the fix, at the 6.1 s mark
        await wait_until(lambda: "third" in seen, timeout=30)
