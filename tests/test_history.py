"""Reading a broker's history and following it live (`eventwire.history`), on real brokers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from eventwire import EventBus
from eventwire.backends.base import Backend, Message
from eventwire.backends.broker import BrokerBackend
from eventwire.bus import DLQ_CONSUMER
from eventwire.event import Event
from eventwire.history import (
    HistoryReader,
    HistoryUnavailableError,
    follow,
    id_time,
    parse_time,
    read_history,
)
from tests.conformance.conftest import backend_url, destroy

HISTORY_KINDS = ["sqlite", "redis", "nats", "amqp-history"]


@contextlib.asynccontextmanager
async def started(url: str, **options: Any) -> AsyncIterator[EventBus]:
    """A started bus on `url`; its namespace is removed from the broker afterwards."""
    try:
        async with EventBus(url, **options) as bus:
            yield bus
    finally:
        await destroy(url)


@pytest.fixture
async def running(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventBus]:
    """A started bus on the parametrized broker."""
    async with started(backend_url(request.param, tmp_path)) as bus:
        yield bus


async def readers_left(bus: EventBus) -> list[str]:
    backend = bus.backend
    assert isinstance(backend, BrokerBackend)
    names = [info.name for info in await backend.consumers()]
    return [name for name in names if name.startswith("_eventwire.") and name != DLQ_CONSUMER]


def numbered(topic: str, count: int, first: int = 0) -> list[Event[Any]]:
    return [Event(topic, {"n": n}, key=f"k{n % 3}") for n in range(first, first + count)]


@pytest.mark.parametrize("running", HISTORY_KINDS, indirect=True)
async def test_reads_exactly_what_was_stored_in_range_then_stops(running: EventBus) -> None:
    before = datetime.now(UTC)
    early = await running.publish_many(numbered("hist.a", 7))
    await running.publish_many(numbered("elsewhere.b", 3))
    middle = datetime.now(UTC)
    late = await running.publish_many(numbered("hist.a", 4, first=7))
    url = running.url

    everything = await read_history(url, patterns=["hist.>"], since=before, timeout=20)
    assert [event.id for event in everything] == [event.id for event in early + late]
    assert [event.payload for event in everything] == [{"n": n} for n in range(11)]
    assert everything.skipped == 0

    first_part = await read_history(
        url, patterns=["hist.>"], since=before, until=middle, timeout=20
    )
    assert [event.id for event in first_part] == [event.id for event in early]
    second_part = await read_history(url, patterns=["hist.>"], since=middle, timeout=20)
    assert [event.id for event in second_part] == [event.id for event in late]
    limited = await read_history(url, patterns=["hist.>", "elsewhere.>"], since=before, limit=5)
    assert len(limited) == 5
    assert await readers_left(running) == []


@pytest.mark.parametrize("running", HISTORY_KINDS, indirect=True)
async def test_a_read_ends_on_a_busy_bus(running: EventBus) -> None:
    """Events keep coming while the read runs: it still ends, with everything stored before
    it began, instead of chasing the publisher until its timeout."""
    since = datetime.now(UTC)
    stored = await running.publish_many(numbered("busy.a", 20))
    stop = asyncio.Event()

    async def keep_publishing() -> None:
        n = 1_000
        while not stop.is_set():
            await running.publish("busy.a", {"n": n})  # far more often than a read polls
            n += 1
            await asyncio.sleep(0.005)

    publisher = asyncio.create_task(keep_publishing())
    try:
        events = await read_history(running.url, patterns=["busy.>"], since=since, timeout=20)
    finally:
        stop.set()
        await publisher
    ids = [event.id for event in events]
    assert ids[:20] == [event.id for event in stored]
    assert await readers_left(running) == []


@pytest.mark.parametrize("running", HISTORY_KINDS, indirect=True)
async def test_a_body_that_is_not_an_envelope_is_skipped_and_counted(running: EventBus) -> None:
    since = datetime.now(UTC)
    await running.publish("junk.a", 1)
    backend = running.backend
    assert isinstance(backend, BrokerBackend)
    await backend.publish([Message("raw-1", "junk.a", None, b"\x00 not an envelope")])
    await running.publish("junk.a", 2)

    history = await read_history(running.url, patterns=["junk.>"], since=since, timeout=20)
    assert [event.payload for event in history] == [1, 2]
    assert history.skipped == 1


@pytest.mark.parametrize("running", ["sqlite"], indirect=True)
async def test_wildcards_reach_the_bus_topics_only_when_named(running: EventBus) -> None:
    since = datetime.now(UTC)
    await running.publish("app.x", "visible")
    await running.publish("_bus.handled", {"subscription": "s"})
    await running.publish("_dlq.app.x", "letter")
    url = running.url

    plain = await read_history(url, patterns=[">"], since=since, timeout=20)
    assert [event.topic for event in plain] == ["app.x"]
    reserved = await read_history(url, patterns=["_bus.>", "_dlq.>"], since=since, timeout=20)
    assert sorted(event.topic for event in reserved) == ["_bus.handled", "_dlq.app.x"]


@pytest.mark.parametrize("running", ["sqlite"], indirect=True)
async def test_the_iterator_reports_progress_and_removes_its_consumers_when_left_early(
    running: EventBus,
) -> None:
    since = datetime.now(UTC)
    await running.publish_many(numbered("many.a", 1200))
    counts: list[int] = []
    async with HistoryReader(
        running.url, ["many.>"], since=since, progress=counts.append
    ) as reader:
        async for event in reader:
            if event.payload == {"n": 600}:
                break
        assert await readers_left(running) != []
    assert reader.read == 601
    assert counts
    assert counts == sorted(counts)
    assert counts[-1] <= 601
    assert await readers_left(running) == []


@pytest.mark.parametrize("kind", ["memory", "amqp"])
async def test_a_bus_without_history_is_a_clear_error(kind: str, tmp_path: Path) -> None:
    url = backend_url(kind, tmp_path)
    try:
        with pytest.raises(HistoryUnavailableError, match="keeps no history"):
            await read_history(url, since=datetime.now(UTC))
    finally:
        await destroy(url)


@pytest.mark.parametrize("running", ["sqlite", "redis", "nats", "amqp"], indirect=True)
async def test_follow_sees_what_is_published_after_it_starts(running: EventBus) -> None:
    await running.publish("live.a", "before")
    seen: list[Event[Any]] = []
    async with follow(running.url, "live.>") as events:
        await running.publish_many([("live.a", "one"), ("other.b", "no"), ("live.b", "two")])

        async def take() -> None:
            async for event in events:
                seen.append(event)
                if len(seen) == 2:
                    return

        await asyncio.wait_for(take(), timeout=20)
    assert [(event.topic, event.payload) for event in seen] == [
        ("live.a", "one"),
        ("live.b", "two"),
    ]
    if running.url.startswith("amqp"):
        return  # amqp lists only durable consumers
    assert await readers_left(running) == []


@pytest.mark.parametrize("running", ["sqlite", "redis"], indirect=True)
async def test_a_cancelled_follower_removes_its_consumer(running: EventBus) -> None:
    entered = asyncio.Event()

    async def tail() -> None:
        async with follow(running.url, "live.>") as events:
            entered.set()
            async for _ in events:
                pass

    task = asyncio.create_task(tail())
    await asyncio.wait_for(entered.wait(), timeout=20)
    assert len(await readers_left(running)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await readers_left(running) == []


async def test_a_connected_backend_is_read_and_left_open(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/bus.db"
    since = datetime.now(UTC)
    async with EventBus(url) as bus:
        await bus.publish("own.a", 1)
        backend = bus.backend
        assert isinstance(backend, Backend)
        first = await read_history(backend, patterns=["own.a"], since=since)
        second = await read_history(backend, patterns=["own.a"], since=since)
        await bus.publish("own.a", 2)
    assert [event.payload for event in first] == [event.payload for event in second] == [1]


def test_times_from_ages_iso_and_event_ids() -> None:
    now = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
    assert parse_time("15m", now=now) == now - timedelta(minutes=15)
    assert parse_time("now", now=now) == now
    assert parse_time("2026-01-31", now=now) == datetime(2026, 1, 31, tzinfo=UTC)
    with pytest.raises(ValueError, match="--until 'soon'"):
        parse_time("soon", option="--until")
    event = Event("t.x")
    moment = id_time(event.id)
    assert moment is not None
    assert abs(moment - event.timestamp) < timedelta(milliseconds=1)
    assert id_time("not-an-id") is None
    assert id_time("0190f3c2-8d4e-4b1a-9c3f-3a5c0e2f41d7") is None  # a UUIDv4
