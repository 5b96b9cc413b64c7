"""`ConsumerSession`, the one consume loop of the feeder and the tools, on every broker
(sqlite, redis, nats, amqp) against the real service. Two backends on one URL stand for two
processes running the same durable consumer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from eventwire.backends.base import Backend, Consumer, ConsumerSpec, Delivery
from eventwire.backends.session import ConsumerSession
from tests.backends.helpers import bodies, fetch_all, messages_on
from tests.backends.test_backend_contract import BROKERS, Broker


@pytest.fixture(params=BROKERS)
async def broker(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Broker]:
    opening = Broker(str(request.param), tmp_path)
    yield opening
    await opening.cleanup()


async def session_holding(
    backend: Backend, spec: ConsumerSpec, *ids: str
) -> tuple[ConsumerSession, list[Delivery]]:
    """A session on `spec` (whose pattern is a topic) holding `ids`, just published to it."""
    session = ConsumerSession(await backend.consumer(spec), spec)
    await backend.publish(messages_on(spec.pattern, *ids))
    held = await fetch_all(session.consumer, len(ids))
    for delivery in held:
        session.hold(delivery, delivery)
    return session, held


async def test_held_deliveries_keep_their_leases_past_ack_wait(broker: Broker) -> None:
    spec = ConsumerSpec("slow", "s", ack_wait=1.0)
    session, held = await session_holding(await broker.open(), spec, "long-job")
    rival = await (await broker.open()).consumer(spec)
    deadline = time.monotonic() + 3.0  # three times ack_wait
    while time.monotonic() < deadline:
        assert await rival.fetch(1, 0.3) == [], "the lease of a held delivery ran out"
    assert session.held == 1
    await session.ack(held)
    assert session.held == 0
    await session.close()
    assert await rival.fetch(1, 1.5) == []  # acknowledged: never delivered again


async def test_a_released_delivery_is_no_longer_kept(broker: Broker) -> None:
    spec = ConsumerSpec("let-go", "g", ack_wait=1.0)
    session, [held] = await session_holding(await broker.open(), spec, "dropped")
    assert session.release(held) is held
    rival = await (await broker.open()).consumer(spec)
    [again] = await fetch_all(rival, 1, timeout=6)  # its lease ran out: it moved on
    assert (again.body, again.attempt) == (b"dropped", 2)
    await rival.ack([again])
    await session.close()


async def test_stop_ends_a_fetch_loop_whose_cancellation_is_swallowed(broker: Broker) -> None:
    spec = ConsumerSpec("stopping", "t", ack_wait=30)
    session = ConsumerSession(await (await broker.open()).consumer(spec), spec)
    consumer: Consumer = session.consumer
    real_fetch = consumer.fetch
    fetching = asyncio.Event()
    swallowed: list[bool] = []

    async def fetch(limit: int, wait: float) -> list[Delivery]:
        fetching.set()
        try:
            return await real_fetch(limit, wait)
        except asyncio.CancelledError:
            swallowed.append(True)  # what a client library racing its own timeout does
            return []

    consumer.fetch = fetch  # type: ignore[method-assign]
    batches: list[list[Delivery]] = []

    async def loop() -> None:
        async for batch in session.batches(10, 5.0):
            batches.append(batch)

    session.run(loop, name="test:loop")
    await asyncio.wait_for(fetching.wait(), timeout=10)
    await asyncio.wait_for(session.stop_running(), timeout=10)
    assert swallowed == [True]
    assert session.stopped
    assert await session.fetch(10, 0.1) == []  # stopped: nothing more is fetched
    assert batches == []
    await session.close()


async def test_fetch_retries_through_errors_unless_told_not_to(broker: Broker) -> None:
    backend = await broker.open()
    spec = ConsumerSpec("flaky", "f", ack_wait=30)
    session = ConsumerSession(await backend.consumer(spec), spec)
    await backend.publish(messages_on("f", "f1"))
    real_fetch = session.consumer.fetch
    failures = [ConnectionError("broker away"), ConnectionError("still away")]

    async def fetch(limit: int, wait: float) -> list[Delivery]:
        if failures:
            raise failures.pop(0)
        return await real_fetch(limit, wait)

    session.consumer.fetch = fetch  # type: ignore[method-assign]
    got = await asyncio.wait_for(session.fetch(5, 2.0), timeout=10)
    assert (bodies(got), failures) == (["f1"], [])
    await session.ack(got)
    failures.append(ConnectionError("gone"))
    strict = ConsumerSession(session.consumer, spec, retry=False)
    with pytest.raises(ConnectionError, match="gone"):
        await strict.fetch(5, 0.1)
    await session.close()


async def test_close_acknowledges_what_was_finished_and_gives_back_what_is_held(
    broker: Broker,
) -> None:
    spec = ConsumerSpec("handback", "h", ack_wait=30)
    session, [done, *left] = await session_holding(await broker.open(), spec, "h1", "h2", "h3")
    assert session.release(done) is done
    session.ack_later([done])
    staying = await (await broker.open()).consumer(spec)
    await session.close()
    await session.close()  # closing again does nothing
    again = await fetch_all(staying, 2, timeout=5)  # long before ack_wait
    assert sorted(bodies(again)) == sorted(bodies(left)) == ["h2", "h3"]
    # Given back, so delivered again (RabbitMQ may count one more: a delivery given back may
    # be pushed to the closing channel once more before it closes, which returns it again).
    assert all(d.attempt >= 2 for d in again)
    await staying.ack(again)
    assert await staying.fetch(5, 0.5) == []  # h1 was acknowledged on close


async def test_give_back_returns_one_held_delivery_now(broker: Broker) -> None:
    backend = await broker.open()
    spec = ConsumerSpec("returns", "r", ack_wait=30)
    session, [kept, returned] = await session_holding(backend, spec, "r1", "r2")
    assert session.give_back(returned)
    assert not session.give_back(returned)  # held no more
    [again] = await fetch_all(session.consumer, 1, timeout=5)
    assert (again.body, again.attempt) == (b"r2", 2)
    await session.ack([kept, again])
    await session.close()


class _SlowAcks(Consumer):
    """A broker's consumer whose acknowledgements wait for `gate`; records whether it was
    closed while one was still being sent."""

    def __init__(self, inner: Consumer) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.acking = 0
        self.closed_while_acking = False

    async def fetch(self, limit: int, wait: float) -> list[Delivery]:
        return await self.inner.fetch(limit, wait)

    async def ack(self, deliveries: Sequence[Delivery], *, handled_ids: Sequence[str] = ()) -> None:
        self.acking += 1
        try:
            await self.gate.wait()
            await self.inner.ack(deliveries, handled_ids=handled_ids)
        finally:
            self.acking -= 1

    async def nak(self, delivery: Delivery, delay: float = 0.0) -> None:
        await self.inner.nak(delivery, delay)

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        await self.inner.extend(deliveries)

    async def close(self) -> None:
        self.closed_while_acking = self.acking > 0
        self.gate.set()
        await self.inner.close()


async def test_close_waits_for_acknowledgements_being_sent(broker: Broker) -> None:
    spec = ConsumerSpec("acked-at-close", "c", ack_wait=30.0)
    backend = await broker.open()
    slow = _SlowAcks(await backend.consumer(spec))
    session = ConsumerSession(slow, spec)
    await backend.publish(messages_on("c", "finished"))
    [held] = await fetch_all(slow, 1)
    session.hold(held, held)
    session.release(held)
    session.ack_later([held])
    deadline = time.monotonic() + 5
    while not slow.acking:  # the acknowledgement is on its way
        assert time.monotonic() < deadline, "ack_later sent nothing"
        await asyncio.sleep(0.01)
    # Let it through after a while, or as soon as the consumer is closed (too early).
    asyncio.get_running_loop().call_later(1.0, slow.gate.set)
    await asyncio.wait_for(session.close(), 10)
    assert not slow.closed_while_acking, "closed with an acknowledgement still on its way"
    rival = await (await broker.open()).consumer(spec)
    assert await rival.fetch(1, 1.5) == []  # acknowledged: not delivered again
