"""Topic and pattern length: one limit in UTF-8 bytes (`MAX_TOPIC_BYTES`), the same on every
backend, with room for every topic's dead letter on every broker; a topic or pattern past it
is refused at publish and at subscribe with the same error, and leaves the bus working."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from eventwire import Event, EventBus, InvalidTopicError, Retry
from eventwire.backends import open_backend
from eventwire.backends.base import Backend, BackendConnectionError, ConsumerSpec, Message
from eventwire.envelope import encode
from eventwire.event import new_event
from eventwire.topics import DEAD_LETTER_PREFIX, MAX_TOPIC_BYTES

from ..backends.helpers import bodies, fetch_all, messages_on
from ..conftest import wait_until
from .conftest import backend_url

# A topic at the limit whose last token is one character, so that patterns at the limit
# match it with either wildcard in place of that token.
LONGEST = "a" * (MAX_TOPIC_BYTES - 2) + ".b"
TAIL_PATTERN = LONGEST[:-1] + ">"
STAR_PATTERN = LONGEST[:-1] + "*"
ONE_BYTE_OVER = "a" * (MAX_TOPIC_BYTES - 2) + ".bc"
# Two bytes per character: fewer characters than the limit, more bytes.
MULTIBYTE = "é" * (MAX_TOPIC_BYTES // 2 + 1)


async def refusal(bus: EventBus, topic: str, *, subscribe: bool = False) -> str:
    """The `InvalidTopicError` message of publishing on `topic` (or subscribing to it)."""

    async def attempt() -> None:
        if subscribe:
            bus.subscribe(topic, lambda event: None, name="refused")
        else:
            await bus.publish(topic, 1)

    with pytest.raises(InvalidTopicError) as refused:
        await asyncio.wait_for(attempt(), 10)
    return str(refused.value)


async def refusal_on_memory(topic: str, *, subscribe: bool = False) -> str:
    async with EventBus("memory://") as memory:
        return await refusal(memory, topic, subscribe=subscribe)


class AlwaysFailing:
    """A handler that raises every time, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, event: Event[Any]) -> None:
        self.calls += 1
        raise RuntimeError("always fails")


TWO_ATTEMPTS = Retry(attempts=2, backoff=0.001)


def check_letter(letters: list[Event[Any]], published: Event[Any]) -> None:
    """`letters` holds one dead letter: that of `published`."""
    [letter] = letters
    assert letter.topic == DEAD_LETTER_PREFIX + published.topic
    assert isinstance(letter.payload, Event)
    assert letter.payload.id == published.id


@contextlib.asynccontextmanager
async def connected_backend(name: str, tmp_path: Path) -> AsyncIterator[Backend]:
    """A connected backend of its own namespace, removed afterwards."""
    backend = open_backend(backend_url(name, tmp_path))
    assert backend is not None
    await backend.connect()
    try:
        yield backend
    finally:
        await backend.destroy()
        await backend.close()


def recorder(ids: list[str]) -> Any:
    """A handler appending the id of every event it receives to `ids`."""

    async def record(event: Event[Any]) -> None:
        ids.append(event.id)

    return record


def test_the_topics_of_this_file_have_the_lengths_they_claim() -> None:
    assert len(LONGEST.encode()) == len(TAIL_PATTERN.encode()) == MAX_TOPIC_BYTES
    assert len(STAR_PATTERN.encode()) == MAX_TOPIC_BYTES
    assert len(ONE_BYTE_OVER.encode()) == MAX_TOPIC_BYTES + 1
    assert len(MULTIBYTE) < MAX_TOPIC_BYTES < len(MULTIBYTE.encode())


async def test_a_topic_at_the_limit_reaches_patterns_at_the_limit(bus: EventBus) -> None:
    received: dict[str, list[str]] = {}
    for name, pattern in (("exact", LONGEST), ("tail", TAIL_PATTERN), ("star", STAR_PATTERN)):
        bus.subscribe(pattern, recorder(received.setdefault(name, [])), name=name)
    published = await bus.publish(LONGEST, {"n": 1})
    await bus.drain(timeout=20)
    assert received == {"exact": [published.id], "tail": [published.id], "star": [published.id]}


async def test_the_dead_letter_of_a_topic_at_the_limit_is_stored(bus: EventBus) -> None:
    failing = AlwaysFailing()
    letters: list[Event[Any]] = []
    picked: list[Event[Any]] = []
    bus.subscribe("_dlq.>", letters.append, name="all-letters")
    # The longest dead-letter pattern: on RabbitMQ its binding key is 255 bytes.
    bus.subscribe(DEAD_LETTER_PREFIX + TAIL_PATTERN, picked.append, name="these-letters")
    subscription = bus.subscribe(LONGEST, failing, name="failing", retry=TWO_ATTEMPTS)
    published = await bus.publish(LONGEST, {"n": 1})
    await wait_until(lambda: bool(letters and picked), timeout=20)
    await bus.drain(timeout=20)
    check_letter(letters, published)
    check_letter(picked, published)
    assert failing.calls == 2
    assert subscription.dead_lettered == 1


@pytest.mark.parametrize("topic", [ONE_BYTE_OVER, MULTIBYTE], ids=["one-byte-over", "multibyte"])
async def test_a_topic_over_the_limit_is_refused_at_publish_as_on_memory(
    bus: EventBus, topic: str
) -> None:
    size = len(topic.encode())
    message = await refusal(bus, topic)
    assert message == await refusal_on_memory(topic)
    assert f"is {size} bytes long (UTF-8), over the limit of {MAX_TOPIC_BYTES}:" in message
    with pytest.raises(InvalidTopicError) as in_a_batch:
        await bus.publish_many([("fits", 1), (topic, 2)])
    assert str(in_a_batch.value) == message


@pytest.mark.parametrize(
    "pattern",
    [
        ONE_BYTE_OVER,
        "a" * (MAX_TOPIC_BYTES - 1) + ".>",
        "a" * (MAX_TOPIC_BYTES - 1) + ".*",
        MULTIBYTE,
    ],
    ids=["one-byte-over", "tail-wildcard", "star-wildcard", "multibyte"],
)
async def test_a_pattern_over_the_limit_is_refused_at_subscribe_as_on_memory(
    bus: EventBus, pattern: str
) -> None:
    size = len(pattern.encode())
    message = await refusal(bus, pattern, subscribe=True)
    assert message == await refusal_on_memory(pattern, subscribe=True)
    assert f"is {size} bytes long (UTF-8), over the limit of {MAX_TOPIC_BYTES}:" in message
    assert "refused" not in bus.subscriptions


async def test_the_bus_still_works_after_refusing_long_topics(bus: EventBus) -> None:
    # 5,000 bytes is past a NATS server's 4 KB protocol line, which closed the connection.
    sizes = (MAX_TOPIC_BYTES + 1, 300, 5_000, 70_000)
    outcomes: list[BaseException | None] = []
    for size in sizes:
        try:
            async with asyncio.timeout(20):
                await bus.publish("a" * size, 1)
        except Exception as error:
            outcomes.append(error)
        else:
            outcomes.append(None)
    received: list[str] = []
    bus.subscribe("after.refusals", recorder(received), name="after")
    async with asyncio.timeout(20):
        published = await bus.publish("after.refusals", 1)
        await bus.drain(timeout=15)
    assert received == [published.id]
    assert [type(outcome) for outcome in outcomes] == [InvalidTopicError] * len(sizes)


async def test_a_dead_letter_that_cannot_be_stored_is_neither_silent_nor_a_loop(
    bus_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An event the bus accepted (here one close to `max_event_bytes`) gets a dead letter
    that can be stored too: without its payload (size, hash and a preview instead) when the
    whole letter is too big. Before, a broker backend failed to store it, logged, and sent
    the event back to the broker, so the handler ran again for ever."""
    limit = 4096
    payload = "x" * 3800
    assert len(encode(new_event("big.event", payload, None, None, None, None))) < limit
    failing = AlwaysFailing()
    letters: list[Event[Any]] = []
    async with EventBus(
        bus_url, close_grace=2.0, redeliver_after=5.0, max_event_bytes=limit
    ) as big_bus:
        big_bus.subscribe("_dlq.>", letters.append, name="letters")
        subscription = big_bus.subscribe("big.event", failing, name="failing", retry=TWO_ATTEMPTS)
        published = await big_bus.publish("big.event", payload)
        await wait_until(lambda: bool(letters), timeout=10)
        check_letter(letters, published)
        assert failing.calls == 2
        assert subscription.dead_lettered == 1
        [letter] = letters
        assert letter.metadata["subscription"] == "failing"
        assert "over the limit" in letter.metadata["payload_dropped"]
        assert letter.payload.payload["bytes"] > limit - 1000
        assert letter.payload.payload["preview"].startswith('{"v":1')
    assert "stored without its payload" in caplog.text


async def test_nats_replaces_a_connection_the_server_closed_on_a_protocol_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A subject past the server's 4 KB protocol line (which the bus no longer sends) makes
    the server close the connection, and nats-py give it up: the backend raises the server's
    error to the publish that caused it and goes on with a new connection."""
    async with connected_backend("nats", tmp_path) as backend:
        consumer = await backend.consumer(ConsumerSpec("orders", "orders.*"))
        too_long = Message("too-long", "orders." + "x" * 5_000, None, b"too-long")
        with pytest.raises(BackendConnectionError, match="maximum control line exceeded"):
            await asyncio.wait_for(backend.publish([too_long]), 15)
        async with asyncio.timeout(15):
            await backend.publish(messages_on("orders.created", "after"))
        after = await fetch_all(consumer, 1)
        assert bodies(after) == ["after"]
        await consumer.ack(after)
    assert "closed the connection" in caplog.text
    assert "opened a new connection" in caplog.text


async def test_amqp_refuses_a_topic_whose_dead_letter_would_not_fit_a_routing_key(
    tmp_path: Path,
) -> None:
    # 251 bytes fit a routing key, but its dead letter's 256 bytes would not.
    async with connected_backend("amqp", tmp_path) as backend:
        with pytest.raises(InvalidTopicError, match="is 251 bytes long"):
            await backend.publish([Message("fits", "a" * 251, None, b"fits")])
