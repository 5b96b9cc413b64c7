"""Other systems' messages on the same broker (``decoder=``), on Redis, NATS and RabbitMQ:
plain JSON and text from the raw clients, CloudEvents (structured and binary, made by the
official SDK), FastStream's messages, and eventwire's own on the same topic, all handled with
typed payloads; what no decoder reads is dead-lettered once, with everything it held."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from cloudevents.core.bindings import http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from pydantic import BaseModel

from eventwire import Event, EventBus, Retry
from eventwire.cloudevent import METADATA_KEY
from tests.conformance.conftest import backend_url, destroy
from tests.conformance.foreign_producers import RedisProducer, producer
from tests.conftest import wait_until

# Each broker another system can share with eventwire (`bus_url` is one of the test's own).
BROKERS = pytest.mark.parametrize("backend_name", ["redis", "nats", "amqp"])


TWICE = Retry(attempts=2, backoff=0.05)


class Order(BaseModel):
    text: str
    n: int


def cloud_event(event_id: str, data: dict[str, Any]) -> CloudEvent:
    attributes = {
        "specversion": "1.0",
        "id": event_id,
        "type": "com.example.order",
        "source": "/shop",
        "subject": f"subject-of-{event_id}",
        "datacontenttype": "application/json",
    }
    return CloudEvent(attributes, data)


@BROKERS
async def test_json_text_cloudevents_and_faststream_messages_are_handled_typed(
    backend_name: str, bus_url: str
) -> None:
    got: dict[str, list[Event[Any]]] = defaultdict(list)
    bus = EventBus(bus_url)

    @bus.subscribe("orders.*", name="orders", decoder=["cloudevents", "json"])
    async def orders(event: Event[Order]) -> None:
        got["orders"].append(event)

    @bus.subscribe("notes.*", name="notes", decoder="text")
    async def notes(event: Event[str]) -> None:
        got["notes"].append(event)

    fmt = JSONFormat()
    async with bus, producer(backend_name, bus_url) as foreign:
        await foreign.raw("orders.created", b'{"text": "raw", "n": 1}', {})
        structured = http.to_structured(cloud_event("ce-2", {"text": "ce", "n": 2}), fmt)
        await foreign.raw("orders.created", structured.body, dict(structured.headers))
        binary = http.to_binary(cloud_event("ce-3", {"text": "bin", "n": 3}), fmt)
        await foreign.raw("orders.paid", binary.body, dict(binary.headers))
        await foreign.faststream("orders.shipped", {"text": "fs", "n": 4}, {})
        await foreign.raw("notes.added", "héllo".encode(), {"content-type": "text/plain"})
        await bus.publish("orders.created", Order(text="own", n=5))  # eventwire's, same topic
        await wait_until(lambda: len(got["orders"]) == 5 and len(got["notes"]) == 1, 30)

    by_n = {event.payload.n: event for event in got["orders"]}
    assert sorted(by_n) == [1, 2, 3, 4, 5]
    assert all(isinstance(event.payload, Order) for event in got["orders"])
    assert by_n[1].topic == "orders.created"
    assert (by_n[2].id, by_n[2].source, by_n[2].topic) == ("ce-2", "/shop", "orders.created")
    assert by_n[2].metadata[METADATA_KEY] == {
        "type": "com.example.order",
        "subject": "subject-of-ce-2",
    }
    assert (by_n[3].id, by_n[3].topic) == ("ce-3", "orders.paid")
    assert by_n[3].metadata[METADATA_KEY]["subject"] == "subject-of-ce-3"
    assert by_n[4].topic == "orders.shipped"
    assert by_n[4].payload == Order(text="fs", n=4)
    assert [(event.topic, event.payload) for event in got["notes"]] == [("notes.added", "héllo")]


@BROKERS
async def test_what_no_decoder_reads_is_dead_lettered_once_with_all_it_held(
    backend_name: str, bus_url: str
) -> None:
    handled: list[str] = []
    letters: list[Event[Any]] = []
    bus = EventBus(bus_url)

    @bus.subscribe("orders.*", name="json-orders", decoder="json")
    async def orders(event: Event[Any]) -> None:
        handled.append(event.topic)

    @bus.subscribe("orders.>", name="audit")  # no decoder: envelopes only
    async def audit(event: Event[Any]) -> None:
        handled.append(f"audit {event.topic}")

    @bus.subscribe("_dlq.>", name="letters")
    async def collect(event: Event[Any]) -> None:
        letters.append(event)

    async with bus, producer(backend_name, bus_url) as foreign:
        await foreign.raw("orders.broken", b"{not json", {"x-origin": "legacy"})
        await bus.publish("orders.done", {"text": "after"})
        await wait_until(lambda: sorted(handled) == ["audit orders.done", "orders.done"], 30)
        await wait_until(lambda: len(letters) >= 2, 30)

    # Each subscription that got it and could not read it says so, with the body and headers.
    by_subscription = {letter.metadata["subscription"]: letter for letter in letters}
    assert sorted(by_subscription) == ["audit", "json-orders"]
    for letter in letters:
        assert letter.topic == "_dlq.orders.broken"
        assert letter.payload["body"] == "{not json"
        assert letter.payload["headers"]["x-origin"] == "legacy"
    assert "the body is not JSON" in by_subscription["json-orders"].metadata["error"]
    assert handled.count("orders.done") == 1  # eventwire's own, beside it


async def test_a_redis_entry_every_subscription_gets_is_dead_lettered_once(
    tmp_path: Path,
) -> None:
    url = backend_url("redis", tmp_path)
    letters: list[Event[Any]] = []
    seen: list[str] = []
    bus = EventBus(url)

    # A decoder reads the entry, but as an event on no topic: refused like the rest.
    @bus.subscribe("a.*", name="one", decoder="text")
    async def one(event: Event[Any]) -> None:
        seen.append("one")

    @bus.subscribe("b.>", name="two")
    async def two(event: Event[Any]) -> None:
        seen.append("two")

    @bus.subscribe("_dlq.>", name="letters")
    async def collect(event: Event[Any]) -> None:
        letters.append(event)

    try:
        async with bus:
            # No topic field: every subscription of the stream gets it.
            client = RedisProducer(url)
            await client.raw("", b"", {"__data__": "\x00\x01 binary", "legacy": "yes"})
            await bus.publish_many([Event("a.x", 1), Event("b.x", 2)])
            await wait_until(lambda: sorted(seen) == ["one", "two"] and letters != [], 30)
            await bus.publish("_dlq.marker", "after the entry, for the letters subscription")
            await wait_until(lambda: letters[-1].topic == "_dlq.marker", 30)
    finally:
        await destroy(url)
    assert len(letters) == 2, "the entry was dead-lettered once, by whichever came first"
    assert letters[0].topic == "_dlq._malformed"
    assert letters[0].payload["headers"] == {"__data__": "\x00\x01 binary", "legacy": "yes"}


@BROKERS
async def test_a_partitioned_subscription_reads_other_producers_messages(
    backend_name: str, bus_url: str
) -> None:
    handled: list[Event[Order]] = []
    bus = EventBus(bus_url)

    @bus.subscribe("orders.*", name="pool", group="pool", partitions=4, decoder="json")
    async def orders(event: Event[Order]) -> None:
        handled.append(event)

    async with bus, producer(backend_name, bus_url) as foreign:
        await foreign.raw("orders.created", b'{"text": "no key", "n": 1}', {"x-from": "raw"})
        await bus.publish("orders.created", Order(text="keyed", n=2), key="k")
        await wait_until(lambda: len(handled) == 2, 30)
    by_n = {event.payload.n: event for event in handled}
    assert by_n[1].metadata["headers"]["x-from"] == "raw"  # the headers came through the router
    assert by_n[2].key == "k"


@pytest.mark.parametrize("backend_name", ["amqp", "amqp-classic"])
async def test_another_producer_s_headers_survive_a_retry_on_rabbitmq(
    backend_name: str, bus_url: str
) -> None:
    """A failed attempt puts a copy of the message in a delay queue: the copy keeps the
    producer's headers (a binary CloudEvent's attributes), not RabbitMQ's own."""
    attempts: list[Event[Order]] = []
    bus = EventBus(bus_url)

    @bus.subscribe("orders.*", name="flaky", decoder="cloudevents", retry=TWICE)
    async def flaky(event: Event[Order]) -> None:
        attempts.append(event)
        if len(attempts) == 1:
            raise RuntimeError("the first attempt fails")

    binary = http.to_binary(cloud_event("ce-9", {"text": "again", "n": 9}), JSONFormat())
    async with bus, producer("amqp", bus_url) as foreign:
        await foreign.raw("orders.created", binary.body, dict(binary.headers))
        await wait_until(lambda: len(attempts) == 2, 30)
    first, second = attempts
    assert second.id == first.id == "ce-9"
    assert second.payload == Order(text="again", n=9)
    assert second.metadata[METADATA_KEY]["subject"] == "subject-of-ce-9"


def test_an_async_decoder_is_refused() -> None:
    async def later(message: Any) -> Event[Any]:
        return Event("t.x", None)

    with pytest.raises(TypeError, match="is async: a decoder is a plain function"):
        EventBus().subscribe("t.x", lambda event: None, decoder=later)
