"""`eventwire.dlq.DeadLetterQueue` on every broker backend: dead letters are read without
being lost, retried to the subscription that gave up on them only, and purged."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from eventwire import BusNotRunningError, Event, EventBus, Retry
from eventwire.backends.base import Message
from eventwire.backends.broker import BrokerBackend
from eventwire.dlq import (
    DeadLetterError,
    DeadLetterNotFoundError,
    DeadLetterQueue,
)
from tests.conformance.conftest import backend_url, destroy

BROKERS = ("sqlite", "redis", "nats", "amqp")


@pytest.fixture(params=BROKERS)
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    address = backend_url(str(request.param), tmp_path)
    yield address
    await destroy(address)


class Worker:
    """A handler that fails until fixed, and what it handled."""

    def __init__(self) -> None:
        self.fixed = False
        self.handled: list[Event[Any]] = []

    async def handle(self, event: Event[Any]) -> None:
        if not self.fixed:
            raise ValueError(f"cannot handle {event.payload}")
        self.handled.append(event)


def new_bus(url: str) -> EventBus:
    return EventBus(url, close_grace=2.0, redeliver_after=5.0)


async def test_retry_goes_to_the_original_subscription_only_and_keeps_the_event(url: str) -> None:
    bus = new_bus(url)
    worker = Worker()
    others: list[Event[Any]] = []
    bus.subscribe("orders.*", worker.handle, name="worker", retry=Retry(attempts=2, backoff=0))
    bus.subscribe("orders.*", others.append, name="audit")
    async with bus:
        published = [await bus.publish("orders.created", {"n": n}) for n in range(3)]
        await bus.drain(timeout=20)
        dlq = DeadLetterQueue(bus)
        letters = await dlq.list()
        assert [letter.event_id for letter in letters] == [event.id for event in published]
        first = letters[0]
        assert (first.topic, first.subscription, first.attempts) == ("orders.created", "worker", 2)
        assert first.error == "ValueError: cannot handle {'n': 0}"
        assert first.error_type == "ValueError"
        assert first.retryable
        assert await dlq.list() == letters  # reading left every letter in place
        # amqp:// counts a returned letter once RabbitMQ has requeued it: a moment later.
        async with asyncio.timeout(5):
            while await dlq.size() != 3:  # noqa: ASYNC110 - a broker count, no event
                await asyncio.sleep(0.01)

        worker.fixed = True
        result = await dlq.retry([first.short_id])
        assert (result.retried, dict(result.skipped)) == (1, {})
        await bus.drain(timeout=20)
        # The same event (same id: within NATS's duplicate window and on SQLite, a same-id
        # republish would have been dropped), for the worker only.
        [again] = worker.handled
        assert (again.id, again.payload, again.target) == (published[0].id, {"n": 0}, "worker")
        assert len(others) == 3
        assert [letter.id for letter in await dlq.list()] == [letter.id for letter in letters[1:]]

        assert (await dlq.retry(all=True)).retried == 2
        await bus.drain(timeout=20)
        assert sorted(e.payload["n"] for e in worker.handled) == [0, 1, 2]
        assert len(others) == 3
        assert await dlq.list() == []


async def test_a_group_gets_its_letters_back_and_one_member_handles_each(url: str) -> None:
    bus = new_bus(url)
    first, second = Worker(), Worker()
    bus.subscribe("jobs.run", first.handle, name="w1", group="workers")
    bus.subscribe("jobs.run", second.handle, name="w2", group="workers")
    async with bus:
        await bus.publish("jobs.run", 1)
        await bus.drain(timeout=20)
        dlq = DeadLetterQueue(bus)
        [letter] = await dlq.list()
        assert letter.group == "workers"
        assert letter.target == "workers"
        first.fixed = second.fixed = True
        assert (await dlq.retry(subscription="workers")).retried == 1
        await bus.drain(timeout=20)
        assert [e.payload for e in first.handled + second.handled] == [1]


async def test_one_event_given_up_by_two_subscriptions_makes_two_letters(url: str) -> None:
    bus = new_bus(url)
    first, second = Worker(), Worker()
    bus.subscribe("mail.send", first.handle, name="smtp")
    bus.subscribe("mail.send", second.handle, name="archive")
    async with bus:
        event = await bus.publish("mail.send", "hello")
        await bus.drain(timeout=20)
        dlq = DeadLetterQueue(bus, page_size=1)  # one letter per page
        letters = await dlq.list()
        assert sorted(letter.subscription or "" for letter in letters) == ["archive", "smtp"]
        assert {letter.event_id for letter in letters} == {event.id}
        with pytest.raises(DeadLetterNotFoundError, match="names 2 dead letters"):
            await dlq.show(event.id)
        first.fixed = second.fixed = True
        assert (await dlq.retry(all=True)).retried == 2
        await bus.drain(timeout=20)
        assert [e.id for e in first.handled + second.handled] == [event.id, event.id]


async def test_filters_select_by_subscription_topic_error_type_and_time(url: str) -> None:
    bus = new_bus(url)

    async def timeout(event: Event[Any]) -> None:
        raise TimeoutError("slow")

    bus.subscribe("orders.>", Worker().handle, name="orders")
    bus.subscribe("billing.*", timeout, name="billing")
    async with bus:
        await bus.publish("orders.created", 1)
        await bus.publish("orders.eu.paid", 2)
        await bus.publish("billing.charge", 3)
        await bus.drain(timeout=20)
        dlq = DeadLetterQueue(bus, page_size=2)  # several pages
        every = await dlq.list()
        assert len(every) == 3

        def topics(letters: list[Any]) -> list[str]:
            return sorted(letter.topic for letter in letters)

        assert topics(await dlq.list(subscription="billing")) == ["billing.charge"]
        assert topics(await dlq.list(topic="orders.*")) == ["orders.created"]
        assert topics(await dlq.list(topic="orders.>")) == ["orders.created", "orders.eu.paid"]
        assert topics(await dlq.list(error_type="timeouterror")) == ["billing.charge"]
        assert len(await dlq.list(limit=2)) == 2
        later = datetime.now(UTC) + timedelta(minutes=1)
        assert await dlq.list(since=later) == []
        assert len(await dlq.list(until=later)) == 3
        assert await dlq.purge(topic="orders.>") == 2
        assert topics(await dlq.list()) == ["billing.charge"]


async def test_named_letters_are_checked_before_anything_is_done(url: str) -> None:
    bus = new_bus(url)
    worker = Worker()
    bus.subscribe("tasks.*", worker.handle, name="worker")
    async with bus:
        await bus.publish("tasks.a", 1)
        await bus.publish("tasks.b", 2)
        await bus.drain(timeout=20)
        dlq = DeadLetterQueue(bus)
        letters = await dlq.list()
        with pytest.raises(DeadLetterNotFoundError, match="no dead letter has id 'nope-nope'"):
            await dlq.purge([letters[0].id, "nope-nope"])
        assert await dlq.list() == letters
        with pytest.raises(DeadLetterNotFoundError):
            await dlq.show("nope-nope")
        assert (await dlq.show(letters[1].event_id or "")).id == letters[1].id
        assert await dlq.purge([letters[0].id, "nope-nope"], missing_ok=True) == 1
        with pytest.raises(DeadLetterError, match="not both"):
            await dlq.retry([letters[1].id], all=True)
        with pytest.raises(DeadLetterError, match="say which letters"):
            await dlq.purge()
        # Its subscription gone from the broker, a retried event would reach nobody.
        assert isinstance(bus.backend, BrokerBackend)
        await bus.backend.delete_consumer("worker")
        with pytest.raises(DeadLetterError, match="'worker' no longer exists"):
            await dlq.retry([letters[1].id])
        result = await dlq.retry(all=True)
        assert (result.retried, list(result.skipped)) == (0, [letters[1].id])
        assert await dlq.list() == letters[1:]


async def test_a_malformed_message_is_listed_with_its_body_and_can_only_be_purged(
    url: str,
) -> None:
    bus = new_bus(url)
    bus.subscribe("raw.in", Worker().handle, name="reader")
    async with bus:
        assert isinstance(bus.backend, BrokerBackend)
        await bus.backend.publish([Message("foreign-1", "raw.in", None, b"not json at all")])
        await bus.drain(timeout=20)  # the reader dead-letters it before acknowledging it
        dlq = DeadLetterQueue(bus)
        [letter] = await dlq.list()
        assert (letter.event, letter.topic, letter.body) == (None, "raw.in", "not json at all")
        assert letter.error_type == "EnvelopeError"
        assert not letter.retryable
        with pytest.raises(DeadLetterError, match="not an eventwire event"):
            await dlq.retry([letter.id])
        assert list((await dlq.retry(all=True)).skipped) == [letter.id]
        assert await dlq.purge([letter.short_id]) == 1
        assert await dlq.list() == []


async def test_the_in_process_bus_has_no_queue_to_manage() -> None:
    with pytest.raises(DeadLetterError, match=r"Subscribe a handler to '_dlq\.>'"):
        DeadLetterQueue(EventBus("memory://"))


async def test_a_bus_that_is_not_running_is_refused(tmp_path: Path) -> None:
    dlq = DeadLetterQueue(EventBus(f"sqlite:///{tmp_path}/bus.db"))
    with pytest.raises(BusNotRunningError):
        await dlq.list()


def test_the_guide_python_example_runs_as_shown(tmp_path: Path) -> None:
    guide = (Path(__file__).resolve().parent.parent / "docs" / "dlq.md").read_text("utf-8")
    section = guide.split("## From Python", 1)[1]
    code, expected = re.findall(r"```(?:python|text)\n(.*?)```", section, re.DOTALL)[:2]
    (tmp_path / "example.py").write_text(code, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
