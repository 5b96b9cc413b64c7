"""The durable contract of the broker backends (sqlite, redis, nats, amqp), each against the
real service. Two `EventBus` objects on one URL stand for two processes: they share nothing
but the broker. Crashes of real processes are in `test_crash.py`."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from eventwire import Event, EventBus, HandlerError, RemoteHandlerError
from eventwire.backends.base import BackendCapabilityError, Message, SubscriptionConflictError
from eventwire.backends.broker import BrokerBackend
from eventwire.deadletter import FOREIGN_BODY_LIMIT
from eventwire.envelope import encode
from tests.conftest import wait_until

DURABLE = ("sqlite", "redis", "nats", "amqp", "amqp-classic")


@pytest.fixture(params=DURABLE)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def new_bus(url: str) -> EventBus:
    return EventBus(url, close_grace=2.0, redeliver_after=2.0)


@pytest.fixture
async def publisher(bus_url: str) -> AsyncIterator[EventBus]:
    """A second process's bus on the same broker, with no subscriptions of its own."""
    async with new_bus(bus_url) as running:
        yield running


async def test_publish_returns_once_stored_and_a_new_process_gets_the_backlog(
    bus_url: str, publisher: EventBus
) -> None:
    seen: list[int] = []
    first = new_bus(bus_url)
    first.subscribe("orders.new", lambda e: None, name="billing")
    async with first:
        pass  # creates the durable subscription, then stops: nothing runs it now
    for n in range(20):
        await publisher.publish("orders.new", n)
    second = new_bus(bus_url)

    async def bill(event: Event[int]) -> None:
        seen.append(event.payload)

    second.subscribe("orders.new", bill, name="billing")
    async with second:
        await wait_until(lambda: len(seen) == 20, timeout=10)
        await second.drain(timeout=10)
    assert seen == list(range(20))


async def test_a_restarted_subscription_resumes_after_what_it_handled(bus_url: str) -> None:
    seen: list[int] = []

    async def handle(event: Event[int]) -> None:
        seen.append(event.payload)

    for round_ in range(3):
        bus = new_bus(bus_url)
        bus.subscribe("jobs.>", handle, name="worker")
        async with bus:
            for n in range(5):
                await bus.publish("jobs.run", round_ * 5 + n)
            await bus.drain(timeout=10)
    assert seen == list(range(15))


async def test_replay_from_earliest_and_from_a_time(bus_url: str, publisher: EventBus) -> None:
    for n in range(3):
        await publisher.publish("audit.log", n)
    # Brokers keep times to the millisecond: leave a few on either side of the cut.
    await asyncio.sleep(0.01)
    cut = datetime.now(UTC)
    await asyncio.sleep(0.01)
    for n in range(3, 6):
        await publisher.publish("audit.log", n)
    everything: list[int] = []
    since: list[int] = []
    bus = new_bus(bus_url)
    backend = bus.backend
    assert isinstance(backend, BrokerBackend)
    if not backend.capabilities.replay:
        with pytest.raises(BackendCapabilityError, match="replay"):
            bus.subscribe("audit.log", lambda e: None, name="history", start="earliest")
        return
    bus.subscribe("audit.log", lambda e: everything.append(e.payload), start="earliest", name="a")
    bus.subscribe("audit.log", lambda e: since.append(e.payload), start=cut, name="b")
    async with bus:
        await wait_until(lambda: len(everything) == 6 and len(since) == 3, timeout=10)
    assert everything == list(range(6))
    assert since == [3, 4, 5]


async def test_processes_running_one_subscription_share_its_events(bus_url: str) -> None:
    handled: dict[str, list[int]] = {"a": [], "b": []}
    buses = []
    for process in ("a", "b"):
        bus = new_bus(bus_url)

        async def work(event: Event[int], process: str = process) -> None:
            handled[process].append(event.payload)
            await asyncio.sleep(0.001)  # both processes get a chance to take some

        bus.subscribe("tasks.*", work, name="workers")
        buses.append(bus)
    async with buses[0], buses[1]:
        for n in range(200):
            await buses[0].publish("tasks.resize", n)
        await wait_until(lambda: len(handled["a"]) + len(handled["b"]) >= 200, timeout=20)
        await buses[0].drain(timeout=10)
    together = sorted(handled["a"] + handled["b"])
    assert together == list(range(200)), "every event handled exactly once across the two"


async def test_drain_and_request_work_across_processes(bus_url: str, publisher: EventBus) -> None:
    done: list[str] = []
    worker = new_bus(bus_url)

    @worker.subscribe("math.square", name="squarer")
    async def square(event: Event[int]) -> int:
        return event.payload * event.payload

    @worker.subscribe("report.make", name="reporter")
    async def report(event: Event[str]) -> None:
        await asyncio.sleep(0.2)
        done.append(event.payload)

    async with worker:
        assert await publisher.request("math.square", 12, timeout=10) == 144
        await publisher.publish("report.make", "weekly")
        if publisher.capabilities.cross_process_drain:
            await publisher.drain(timeout=10)  # waits for the other process's handler
            assert done == ["weekly"]
        else:  # (the README's table says so) only the handler's own process can wait for it
            await wait_until(lambda: done == ["weekly"], timeout=10)


async def test_idempotent_subscription_handles_a_redelivered_event_once(
    bus_url: str, publisher: EventBus
) -> None:
    counts: dict[str, int] = {}
    bus = new_bus(bus_url)
    backend = bus.backend
    assert isinstance(backend, BrokerBackend)
    if not backend.capabilities.idempotent:
        # Refused at once, when subscribing, not later when the bus starts.
        with pytest.raises(BackendCapabilityError, match="handled event ids"):
            bus.subscribe("pay.*", lambda e: None, name="payer", idempotent=True)
        assert "payer" not in bus.subscriptions
        return

    async def pay(event: Event[Any]) -> None:
        counts[event.id] = counts.get(event.id, 0) + 1

    bus.subscribe("pay.*", pay, name="payer", idempotent=True)
    async with bus:
        event = await publisher.publish("pay.card", {"amount": 5})
        await bus.drain(timeout=10)
        # The same event stored again, as after a publisher retry or a lost acknowledgement.
        await publisher.backend.publish(  # type: ignore[union-attr]
            [Message(event.id, event.topic, None, encode(event))]
        )
        await publisher.publish("pay.card", {"amount": 6})
        await bus.drain(timeout=10)
    assert sorted(counts.values()) == [1, 1]


async def orders_and_dead_letters(bus: EventBus) -> tuple[list[int], list[Event[Any]]]:
    """Subscriptions "orders" (``orders.*``) and "dlq" (``_dlq.>``), both ready for a raw
    publish (which does not wait for them): the payloads and the letters they get."""
    seen: list[int] = []
    dead: list[Event[Any]] = []
    orders = bus.subscribe("orders.*", lambda e: seen.append(e.payload), name="orders")
    letters = bus.subscribe("_dlq.>", dead.append, name="dlq")
    await asyncio.gather(orders.ready(), letters.ready())
    return seen, dead


async def test_a_malformed_message_goes_to_the_dlq_and_the_consumer_goes_on(
    bus: EventBus,
) -> None:
    seen, dead = await orders_and_dead_letters(bus)
    await bus.publish("orders.new", 1)
    await bus.backend.publish(
        [
            Message("foreign-1", "orders.new", None, b'{"not": "an envelope"'),
            Message("x", "orders.new", None, b"\xff\x00"),
        ]
    )
    await bus.publish("orders.new", 2)
    await wait_until(lambda: seen == [1, 2] and len(dead) == 2, timeout=10)
    assert {e.topic for e in dead} == {"_dlq.orders.new"}
    assert all("not a valid eventwire envelope" in e.payload["error"] for e in dead)
    assert {e.metadata["subscription"] for e in dead} == {"orders"}
    assert dead[0].payload["body"] == '{"not": "an envelope"' or dead[1].payload["body_base64"]
    assert bus.stats()["orders"].dead_lettered == 2


async def test_a_message_too_deep_to_decode_fails_alone_not_its_batch(bus: EventBus) -> None:
    # 4 KB of nested brackets among innocent events fetched in the same batch: decoding it
    # raised RecursionError, which dropped the whole batch, leased again and again forever.
    seen, dead = await orders_and_dead_letters(bus)
    deep = b'{"v": 1, "payload": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    innocent = [
        Message(f"ok-{n}", "orders.new", None, encode(Event("orders.new", n))) for n in range(5)
    ]
    await bus.backend.publish(
        [*innocent[:2], Message("deep", "orders.new", None, deep), *innocent[2:]]
    )
    await wait_until(lambda: sorted(seen) == list(range(5)) and len(dead) == 1, timeout=10)
    assert "nests too deep" in dead[0].payload["error"]
    await bus.drain(timeout=10)
    assert bus.stats()["orders"].dead_lettered == 1


async def test_a_foreign_envelope_not_for_its_topic_is_dead_lettered_not_dropped(
    bus: EventBus,
) -> None:
    # Valid envelopes that another producer put on "orders.new": one says another topic that
    # the subscription does not read, one an invalid topic. Both were acknowledged silently.
    seen, dead = await orders_and_dead_letters(bus)
    elsewhere = encode(Event("billing.paid", 1))
    invalid = encode(Event("orders.new", 2)).replace(b'"orders.new"', b'"orders..new"')
    await bus.backend.publish(
        [
            Message("foreign-1", "orders.new", None, elsewhere),
            Message("foreign-2", "orders.new", None, invalid),
        ]
    )
    await bus.publish("orders.new", 3)
    await wait_until(lambda: seen == [3] and len(dead) == 2, timeout=10)
    assert {letter.topic for letter in dead} == {"_dlq.orders.new"}
    reasons = sorted(letter.payload["error"] for letter in dead)
    assert "says topic 'billing.paid', but it was published on 'orders.new'" in reasons[0]
    assert "topic 'orders..new' is not a valid topic" in reasons[1]
    assert {letter.payload["body"] for letter in dead} == {elsewhere.decode(), invalid.decode()}


async def test_a_foreign_message_too_big_to_keep_whole_is_dead_lettered_cut(
    bus: EventBus,
) -> None:
    seen, dead = await orders_and_dead_letters(bus)
    # Control characters grow six times when escaped (300 KB -> 1.8 MB of JSON); plain text
    # of 900 KB; both under every broker's own message limit.
    bodies = [b'"' + b"\x01" * 300_000, b"x" * 900_000]
    for number, body in enumerate(bodies):
        await bus.backend.publish([Message(f"big-{number}", "orders.new", None, body)])
    await bus.publish("orders.new", 2)
    await wait_until(lambda: seen == [2] and len(dead) == 2, timeout=30)
    for letter in dead:
        body = bodies[0] if letter.payload["bytes"] == len(bodies[0]) else bodies[1]
        assert letter.payload["truncated"] is True
        assert letter.payload["sha256"] == hashlib.sha256(body).hexdigest()
        assert body.decode().startswith(letter.payload["body"])
        assert len(letter.payload["body"]) == FOREIGN_BODY_LIMIT
        assert "not a valid eventwire envelope" in letter.payload["error"]
    assert {letter.payload["bytes"] for letter in dead} == {len(body) for body in bodies}


async def test_unsubscribe_keeps_the_durable_subscription_and_its_backlog(
    bus_url: str, publisher: EventBus
) -> None:
    seen: list[int] = []
    bus = new_bus(bus_url)
    async with bus:
        sub = bus.subscribe("t.x", lambda e: seen.append(e.payload), name="keeper")
        await sub.ready()  # its durable consumer exists: another process's events reach it
        await publisher.publish("t.x", 0)
        await wait_until(lambda: seen == [0], timeout=10)
        await sub.unsubscribe()
        await publisher.publish("t.x", 1)  # owed to "keeper", which nothing runs now
        bus.subscribe("t.x", lambda e: seen.append(e.payload), name="keeper")
        await wait_until(lambda: seen == [0, 1], timeout=10)
        await bus.subscriptions["keeper"].unsubscribe(forget=True)
        await publisher.publish("t.x", 2)
        await publisher.drain(timeout=10)  # nothing owes it: the subscription is gone
    assert seen == [0, 1]


async def test_reopening_a_subscription_with_another_pattern_is_refused(bus_url: str) -> None:
    first = new_bus(bus_url)
    first.subscribe("a.*", lambda e: None, name="same")
    async with first:
        pass
    second = new_bus(bus_url)
    second.subscribe("b.*", lambda e: None, name="same")
    with pytest.raises(ValueError, match=r"'a\.\*'"):
        async with second:
            pass


async def test_a_group_named_like_another_process_subscription_is_refused(
    bus_url: str, publisher: EventBus
) -> None:
    # One process runs subscription "audit" and group "workers"; another process must not
    # join "audit" as a group, nor run a lone subscription named "workers": on the broker
    # either would share the first one's consumer and take half of its events.
    got: dict[str, list[int]] = {"audit": [], "workers": []}
    first = new_bus(bus_url)
    first.subscribe("t.x", lambda e: got["audit"].append(e.payload), name="audit")
    first.subscribe("t.x", lambda e: got["workers"].append(e.payload), name="w1", group="workers")
    async with first:
        for clash in (
            {"name": "audit-2", "group": "audit"},
            {"name": "workers"},
        ):
            second = new_bus(bus_url)
            second.subscribe("t.x", lambda e: None, **clash)
            with pytest.raises(SubscriptionConflictError) as refused:
                async with second:
                    pass
            assert "eventwire subscriptions delete" in str(refused.value)
        for n in range(10):
            await publisher.publish("t.x", n)
        await first.drain(timeout=10)
    assert got == {"audit": list(range(10)), "workers": list(range(10))}


async def test_key_order_across_processes_where_the_backend_promises_it(bus_url: str) -> None:
    buses = [new_bus(bus_url), new_bus(bus_url)]
    if not buses[0].capabilities.key_order_across_processes:
        pytest.skip("this backend does not promise per-key order across processes (README)")
    handled: list[tuple[str, int]] = []
    busy: set[str] = set()
    overlaps: list[str] = []
    for bus in buses:

        async def work(event: Event[int]) -> None:
            key = event.key
            assert key is not None
            if key in busy:
                overlaps.append(key)
            busy.add(key)
            await asyncio.sleep(0.002)
            busy.discard(key)
            handled.append((key, event.payload))

        bus.subscribe("orders.*", work, name="ordered", concurrency=4, partitions=4)
    async with buses[0], buses[1]:
        for n in range(60):
            await buses[0].publish("orders.update", n, key=f"customer-{n % 3}")
        await wait_until(lambda: len(handled) == 60, timeout=30)
    assert not overlaps, "same-key events never ran at the same time"
    for key in ("customer-0", "customer-1", "customer-2"):
        numbers = [n for k, n in handled if k == key]
        assert numbers == sorted(numbers), f"{key} handled in publish order"


async def test_close_gives_unfinished_events_back_at_once(bus_url: str) -> None:
    gate = asyncio.Event()
    taken: list[int] = []
    slow = EventBus(bus_url, close_grace=0.2, redeliver_after=60)

    async def stuck(event: Event[int]) -> None:
        taken.append(event.payload)
        await gate.wait()

    slow.subscribe("work.item", stuck, name="workers")
    async with slow:
        for n in range(5):
            await slow.publish("work.item", n)
        await wait_until(lambda: len(taken) == 1, timeout=10)
        report = await slow.close()
    assert not report.clean
    assert {u.event.payload for u in report.unhandled} <= set(range(5))
    finished: list[int] = []
    # Long before the 60 s lease would run out, another process of the subscription has them.
    other = EventBus(bus_url, redeliver_after=60)
    other.subscribe("work.item", lambda e: finished.append(e.payload), name="workers")
    async with other:
        await wait_until(lambda: sorted(finished) == list(range(5)), timeout=10)


async def test_tool_consumers_are_not_waited_for_nor_asked(
    bus_url: str, publisher: EventBus
) -> None:
    """A history reader, stats responder or the dead-letter store (`_eventwire.*`) holds
    events no application handler will finish: drain() does not wait for them and request()
    does not count them as someone who could answer."""
    from eventwire.backends.base import ConsumerSpec
    from eventwire.errors import NoReplyError

    backend = publisher.backend
    assert isinstance(backend, BrokerBackend)
    reader = await backend.consumer(
        ConsumerSpec("_eventwire.test-reader", ">", "latest", 30.0, ephemeral=True)
    )
    try:
        await publisher.publish("audit.entry", 1)  # outstanding for the reader, never acked
        await publisher.drain(timeout=5)
        with pytest.raises(NoReplyError, match=r"no subscription matches 'audit\.entry'"):
            await publisher.request("audit.entry", 2, timeout=5)
    finally:
        await reader.close()
        await backend.delete_consumer("_eventwire.test-reader")


async def test_a_request_answered_by_another_process(bus_url: str, publisher: EventBus) -> None:
    # `publisher` stands for another process: its requests travel through the broker, and
    # so do the answers (the first non-None) and failures (named, with their type).
    worker = new_bus(bus_url)
    watched: list[str] = []

    async def double(event: Event[int]) -> int:
        return event.payload * 2

    async def broken(event: Event[Any]) -> None:
        raise ZeroDivisionError("division by zero")

    async def watch(event: Event[Any]) -> None:
        watched.append(event.topic)

    worker.subscribe("math.double", double, name="doubler")
    worker.subscribe("math.div", broken, name="divider-1", group="dividers")
    worker.subscribe("_bus.>", watch, name="watcher")
    async with worker:
        assert await publisher.request("math.double", 21, timeout=10) == 42
        with pytest.raises(HandlerError) as failure:
            await publisher.request("math.div", 1, timeout=10)
        assert failure.value.subscription == "divider-1"
        cause = failure.value.__cause__
        assert isinstance(cause, RemoteHandlerError)
        assert cause.error_type == "ZeroDivisionError"
        await publisher.publish("_bus.note", "seen")
        await wait_until(lambda: "_bus.note" in watched, timeout=10)
    # The replies crossed the broker on the requester's reply topic, seen by no one else.
    assert not [topic for topic in watched if topic.startswith("_bus.reply.")]
