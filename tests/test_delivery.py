"""The in-process delivery contract: each test fails if its guarantee is broken."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

import pytest

from eventwire import (
    BusClosedError,
    Event,
    EventBus,
    InboxFullError,
    PublishTimeoutError,
    Retry,
)

from .conftest import wait_until


async def test_fan_out_delivers_one_event_with_metadata_to_every_subscriber(bus: EventBus) -> None:
    seen: dict[str, list[Event[Any]]] = {"audit": [], "notify": []}

    async def audit(event: Event[Any]) -> None:
        seen["audit"].append(event)

    async def notify(event: Event[Any]) -> None:
        seen["notify"].append(event)

    bus.subscribe("user.query", audit, name="audit")
    bus.subscribe("user.query", notify, name="notify")
    published = await bus.publish(
        Event(topic="user.query", payload="revenue?", metadata={"user_id": "user-123"})
    )
    await bus.drain(timeout=2)
    assert [e.id for e in seen["audit"]] == [published.id]
    assert [e.id for e in seen["notify"]] == [published.id]
    assert seen["audit"][0].metadata["user_id"] == "user-123"
    assert seen["notify"][0].payload == "revenue?"


async def test_shorthand_publish_builds_the_event(bus: EventBus) -> None:
    got: list[Event[Any]] = []
    bus.subscribe("user.query", got.append, name="sync-append")
    event = await bus.publish("user.query", "short", metadata={"user_id": "u-1"}, key="k1")
    await bus.drain(timeout=2)
    assert got[0].id == event.id
    assert (got[0].payload, got[0].metadata["user_id"], got[0].key) == ("short", "u-1", "k1")
    assert event.source is None
    assert event.causation_id is None


async def test_handlers_never_run_inside_publish(bus: EventBus) -> None:
    tasks: list[asyncio.Task[Any] | None] = []

    async def handler(event: Event[Any]) -> None:
        tasks.append(asyncio.current_task())

    bus.subscribe("t.run", handler)
    await bus.publish("t.run", 1)
    if not bus.capabilities.durable:
        assert tasks == []  # queued, not run, when publish returns
    # (On a broker another task may have fetched and handled it while publish awaited the
    # broker's reply: what matters is that it never runs inside publish, checked below.)
    await bus.drain(timeout=2)
    assert len(tasks) == 1
    assert tasks[0] is not asyncio.current_task()


async def test_stuck_subscriber_does_not_delay_others_or_publish(bus: EventBus) -> None:
    gate = asyncio.Event()
    fast: list[int] = []

    async def stuck(event: Event[int]) -> None:
        await gate.wait()

    async def quick(event: Event[int]) -> None:
        fast.append(event.payload)

    bus.subscribe("work", stuck, name="stuck")
    bus.subscribe("work", quick, name="quick")
    for n in range(500):
        await asyncio.wait_for(bus.publish("work", n), timeout=1)
    await wait_until(lambda: len(fast) == 500)
    assert fast == list(range(500))
    assert bus.stats()["stuck"].handled == 0
    gate.set()
    await bus.drain(timeout=2)
    assert bus.stats()["stuck"].handled == 500


async def test_failing_subscriber_affects_no_one(bus: EventBus) -> None:
    good: list[int] = []

    async def broken(event: Event[int]) -> None:
        raise RuntimeError("always broken")

    async def fine(event: Event[int]) -> None:
        good.append(event.payload)

    bus.subscribe("work", broken, name="broken")
    bus.subscribe("work", fine, name="fine")
    for n in range(50):
        await bus.publish("work", n)  # never raises the handler's error
    await bus.drain(timeout=2)
    assert good == list(range(50))
    assert bus.stats()["broken"].dead_lettered == 50
    assert bus.running


async def test_events_are_handled_in_publish_order(bus: EventBus) -> None:
    seen: list[int] = []
    rng = random.Random(7)

    async def handler(event: Event[int]) -> None:
        for _ in range(rng.randint(0, 3)):
            await asyncio.sleep(0)
        seen.append(event.payload)

    bus.subscribe("ordered", handler)
    for n in range(1_000):
        await bus.publish("ordered", n)
    await bus.drain(timeout=5)
    assert seen == list(range(1_000))


async def test_concurrency_runs_handlers_in_parallel(bus: EventBus) -> None:
    active = 0
    peak = 0
    release = asyncio.Event()

    async def handler(event: Event[int]) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await release.wait()
        active -= 1

    bus.subscribe("par", handler, concurrency=4)
    for n in range(10):
        await bus.publish("par", n)
    await wait_until(lambda: peak == 4)
    release.set()
    await bus.drain(timeout=2)
    assert peak == 4  # never more than `concurrency`


async def test_same_key_is_serialised_and_ordered_under_concurrency(bus: EventBus) -> None:
    rng = random.Random(3)
    in_flight: set[str] = set()
    overlap_same_key: list[str] = []
    peak = 0
    seen: dict[str, list[int]] = {}

    async def handler(event: Event[int]) -> None:
        nonlocal peak
        key = event.key
        assert key is not None
        if key in in_flight:
            overlap_same_key.append(key)
        in_flight.add(key)
        peak = max(peak, len(in_flight))
        for _ in range(rng.randint(0, 4)):
            await asyncio.sleep(0)
        seen.setdefault(key, []).append(event.payload)
        in_flight.discard(key)

    bus.subscribe("keyed", handler, concurrency=4)
    expected: dict[str, list[int]] = {}
    plan = [(n, f"k{rng.randint(0, 5)}") for n in range(800)]
    for n, key in plan:
        expected.setdefault(key, []).append(n)
    # Published all at once (in this order), so that on a broker too events of different
    # keys are waiting together and can run concurrently.
    await asyncio.gather(*(bus.publish("keyed", n, key=key) for n, key in plan))
    await bus.drain(timeout=10)
    assert overlap_same_key == []
    assert seen == expected
    assert peak > 1  # different keys did run concurrently


async def test_group_members_compete_each_event_goes_to_one(bus: EventBus) -> None:
    handled: dict[str, list[int]] = {"w1": [], "w2": [], "w3": []}
    everything: list[int] = []

    def member(name: str) -> Any:
        async def handle(event: Event[int]) -> None:
            handled[name].append(event.payload)
            await asyncio.sleep(0)

        return handle

    for name in handled:
        bus.subscribe("jobs.*", member(name), name=name, group="workers")

    async def audit(event: Event[int]) -> None:
        everything.append(event.payload)

    bus.subscribe("jobs.>", audit, name="audit")
    for n in range(300):
        await bus.publish("jobs.run", n)
    await bus.drain(timeout=5)
    combined = sorted(handled["w1"] + handled["w2"] + handled["w3"])
    assert combined == list(range(300))
    assert all(handled[name] for name in handled)  # the work was shared
    assert everything == list(range(300))  # a solo subscriber still sees every event


async def test_retry_then_success(bus: EventBus) -> None:
    calls: list[float] = []

    async def flaky(event: Event[Any]) -> None:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("try again")

    dead: list[Event[Any]] = []
    bus.subscribe("_dlq.>", dead.append, name="dlq")
    bus.subscribe("flaky", flaky, name="flaky", retry=Retry(attempts=3, backoff=0.02))
    await bus.publish("flaky", 1)
    await bus.drain(timeout=2)
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.02 * 0.9
    assert calls[2] - calls[1] >= 0.04 * 0.9  # exponential backoff
    stats = bus.stats()["flaky"]
    assert (stats.handled, stats.failed, stats.retried, stats.dead_lettered) == (1, 2, 2, 0)
    assert dead == []


async def test_retry_exhausted_goes_to_dlq_with_details(bus: EventBus) -> None:
    attempts = 0

    async def broken(event: Event[Any]) -> None:
        nonlocal attempts
        attempts += 1
        raise ValueError(f"bad input {event.payload}")

    dead: list[Event[Any]] = []
    errors: list[Event[Any]] = []

    async def on_dead(event: Event[Any]) -> None:
        dead.append(event)

    async def on_error(event: Event[Any]) -> None:
        errors.append(event)

    bus.subscribe("_dlq.>", on_dead, name="dlq")
    bus.subscribe("_bus.error", on_error, name="errors")
    bus.subscribe("orders.created", broken, name="billing", retry=Retry(attempts=3, backoff=0.001))
    original = await bus.publish("orders.created", 42, metadata={"user_id": "u-9"})
    await bus.drain(timeout=2)
    assert attempts == 3
    assert len(dead) == 1
    letter = dead[0]
    assert letter.topic == "_dlq.orders.created"
    assert isinstance(letter.payload, Event)
    assert letter.payload.id == original.id
    assert letter.payload.metadata["user_id"] == "u-9"
    assert letter.metadata["error"] == "ValueError: bad input 42"
    assert letter.metadata["error_type"] == "ValueError"
    assert letter.metadata["subscription"] == "billing"
    assert letter.metadata["attempts"] == 3
    assert letter.causation_id == original.id
    assert letter.correlation_id == original.correlation_id
    assert len(errors) == 1
    assert errors[0].payload["subscription"] == "billing"
    assert errors[0].payload["event_id"] == original.id


async def test_wildcards_do_not_reach_bus_topics(bus: EventBus) -> None:
    everything: list[str] = []

    async def broken(event: Event[Any]) -> None:
        raise RuntimeError("x")

    async def spy(event: Event[Any]) -> None:
        everything.append(event.topic)

    bus.subscribe(">", spy, name="spy")
    bus.subscribe("a.b", broken, name="broken")
    await bus.publish("a.b", 1)
    await bus.drain(timeout=2)
    assert everything == ["a.b"]  # not _dlq.a.b nor _bus.error


async def test_exceptions_outside_retry_on_are_not_retried(bus: EventBus) -> None:
    calls = 0

    async def handler(event: Event[Any]) -> None:
        nonlocal calls
        calls += 1
        raise KeyError("permanent")

    bus.subscribe(
        "t", handler, name="h", retry=Retry(attempts=5, backoff=0.001, retry_on=(ConnectionError,))
    )
    await bus.publish("t", 1)
    await bus.drain(timeout=2)
    assert calls == 1
    assert bus.stats()["h"].dead_lettered == 1


async def test_handler_timeout_cancels_and_counts_as_failure(bus: EventBus) -> None:
    cancelled = asyncio.Event()
    handled: list[int] = []

    async def handler(event: Event[int]) -> None:
        if event.payload == 0:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        handled.append(event.payload)

    dead: list[Event[Any]] = []
    bus.subscribe("_dlq.slow", dead.append, name="dlq")
    bus.subscribe("slow", handler, name="slow", timeout=0.05, retry=Retry(attempts=2, backoff=0))
    await bus.publish("slow", 0)
    await bus.publish("slow", 1)
    await bus.drain(timeout=3)
    assert cancelled.is_set()
    assert handled == [1]
    assert dead[0].metadata["attempts"] == 2
    assert "timeout=0.05s" in dead[0].metadata["error"]
    assert bus.stats()["slow"].failed == 2


async def test_drain_waits_for_cascades(bus: EventBus) -> None:
    finished: list[str] = []

    async def first(event: Event[Any]) -> None:
        await asyncio.sleep(0.01)
        await bus.publish("step.two", event.payload)

    async def second(event: Event[Any]) -> None:
        await asyncio.sleep(0.01)
        await bus.publish("step.three", event.payload)

    async def third(event: Event[Any]) -> None:
        await asyncio.sleep(0.01)
        finished.append(event.payload)

    bus.subscribe("step.one", first)
    bus.subscribe("step.two", second)
    bus.subscribe("step.three", third)
    for n in range(5):
        await bus.publish("step.one", str(n))
    await bus.drain(timeout=3)
    assert finished == ["0", "1", "2", "3", "4"]


async def test_drain_does_not_wait_for_later_publishes(bus: EventBus) -> None:
    early_gate = asyncio.Event()
    later_gate = asyncio.Event()

    async def early(event: Event[Any]) -> None:
        await early_gate.wait()

    async def later(event: Event[Any]) -> None:
        await later_gate.wait()

    bus.subscribe("early", early)
    bus.subscribe("later", later, name="later")
    await bus.publish("early", 1)
    draining = asyncio.ensure_future(bus.drain(timeout=3))
    await asyncio.sleep(0)
    await bus.publish("later", 2)  # published after drain() began
    early_gate.set()
    await asyncio.wait_for(draining, timeout=3)
    assert bus.stats()["later"].handled == 0
    later_gate.set()
    await bus.drain(timeout=2)


async def test_drain_timeout_names_what_is_stuck(bus: EventBus) -> None:
    gate = asyncio.Event()

    async def stuck(event: Event[Any]) -> None:
        await gate.wait()

    bus.subscribe("t", stuck, name="stuck-one")
    await bus.publish("t", 1)
    await bus.publish("t", 2)
    with pytest.raises(TimeoutError, match="stuck-one") as info:
        await bus.drain(timeout=0.05)
    assert "1 queued, 1 in flight" in str(info.value)
    gate.set()
    await bus.drain(timeout=2)


async def test_drain_inside_a_handler_is_refused(bus: EventBus) -> None:
    errors: list[Event[Any]] = []

    async def handler(event: Event[Any]) -> None:
        await bus.drain()

    bus.subscribe("_dlq.t", errors.append, name="dlq")
    bus.subscribe("t", handler)
    await bus.publish("t", 1)
    await bus.drain(timeout=2)
    assert "would wait for that handler" in errors[0].metadata["error"]


async def test_bad_topic_and_pattern_raise_value_error(bus: EventBus) -> None:
    async def handler(event: Event[Any]) -> None: ...

    with pytest.raises(ValueError, match="'>' must be last"):
        bus.subscribe("a.>.b", handler)
    with pytest.raises(ValueError, match="empty token"):
        bus.subscribe("a..b", handler)
    with pytest.raises(ValueError, match="wildcard"):
        await bus.publish("a.*", 1)
    with pytest.raises(ValueError, match="invalid character"):
        await bus.publish("a b", 1)


async def test_event_published_before_subscription_is_not_delivered(bus: EventBus) -> None:
    seen: list[int] = []

    async def late(event: Event[int]) -> None:
        seen.append(event.payload)

    await bus.publish("t", 1)
    bus.subscribe("t", late)
    await bus.publish("t", 2)
    await bus.drain(timeout=2)
    assert seen == [2]


async def test_handlers_can_subscribe_unsubscribe_and_publish(bus: EventBus) -> None:
    seen: list[str] = []

    async def dynamic(event: Event[Any]) -> None:
        seen.append(f"dynamic:{event.payload}")

    async def controller(event: Event[Any]) -> None:
        if event.payload == "add":
            bus.subscribe("dyn", dynamic, name="dynamic")
            await bus.publish("dyn", "after-add")
        elif event.payload == "remove":
            # forget: on a broker the durable subscription goes too (memory keeps nothing).
            await bus.subscriptions["dynamic"].unsubscribe(forget=True)
            await bus.publish("dyn", "after-remove")

    async def self_removing(event: Event[Any]) -> None:
        seen.append(f"once:{event.payload}")
        await bus.subscriptions["once"].unsubscribe(forget=True)

    bus.subscribe("control", controller, name="controller")
    bus.subscribe("dyn", self_removing, name="once")
    await bus.publish("control", "add")
    await bus.drain(timeout=2)
    await bus.publish("control", "remove")
    await bus.drain(timeout=2)
    assert seen == ["once:after-add", "dynamic:after-add"] or seen == [
        "dynamic:after-add",
        "once:after-add",
    ]
    assert "dynamic" not in bus.subscriptions
    assert "once" not in bus.subscriptions


async def test_unsubscribe_handles_what_was_queued_then_stops(bus: EventBus) -> None:
    seen: list[int] = []

    async def handler(event: Event[int]) -> None:
        seen.append(event.payload)

    sub = bus.subscribe("t", handler, name="h")
    for n in range(5):
        await bus.publish("t", n)
    await sub.unsubscribe()
    assert seen == [0, 1, 2, 3, 4]
    await bus.publish("t", 99)
    await bus.drain(timeout=2)
    assert seen == [0, 1, 2, 3, 4]
    assert not sub.active


async def test_overflow_block_waits_for_room(bus: EventBus) -> None:
    gate = asyncio.Event()

    async def slow(event: Event[int]) -> None:
        await gate.wait()

    bus.subscribe("t", slow, name="slow", max_pending=2)
    await bus.publish("t", 0)
    await wait_until(lambda: bus.stats()["slow"].in_flight == 1)
    await asyncio.wait_for(bus.publish("t", 1), timeout=1)
    await asyncio.wait_for(bus.publish("t", 2), timeout=1)  # the inbox is now full
    blocked = asyncio.ensure_future(bus.publish("t", 3))
    await asyncio.sleep(0.02)
    assert not blocked.done()
    assert bus.stats()["slow"].queued == 3  # two in the inbox, one waiting to get in
    gate.set()
    await asyncio.wait_for(blocked, timeout=2)
    await bus.drain(timeout=2)
    assert bus.stats()["slow"].handled == 4


async def test_overflow_drop_oldest_drops_and_counts(bus: EventBus) -> None:
    gate = asyncio.Event()
    seen: list[int] = []

    async def slow(event: Event[int]) -> None:
        await gate.wait()
        seen.append(event.payload)

    bus.subscribe("t", slow, name="slow", max_pending=3, overflow="drop_oldest")
    await bus.publish("t", 0)
    await wait_until(lambda: bus.stats()["slow"].in_flight == 1)
    for n in range(1, 8):
        await asyncio.wait_for(bus.publish("t", n), timeout=1)  # never blocks
    assert bus.stats()["slow"].dropped == 4
    gate.set()
    await bus.drain(timeout=2)
    assert seen == [0, 5, 6, 7]


async def test_overflow_error_raises_and_others_still_receive(bus: EventBus) -> None:
    gate = asyncio.Event()
    other: list[int] = []

    async def slow(event: Event[int]) -> None:
        await gate.wait()

    async def fast(event: Event[int]) -> None:
        other.append(event.payload)

    bus.subscribe("t", slow, name="strict", max_pending=1, overflow="error")
    bus.subscribe("t", fast, name="fast")
    await bus.publish("t", 0)
    await wait_until(lambda: bus.stats()["strict"].in_flight == 1)
    await bus.publish("t", 1)
    with pytest.raises(InboxFullError, match="'strict' is full") as info:
        await bus.publish("t", 2)
    assert info.value.subscription == "strict"
    assert info.value.event.payload == 2
    gate.set()
    await bus.drain(timeout=2)
    assert other == [0, 1, 2]
    assert bus.stats()["strict"].handled == 2


async def test_blocked_publish_times_out_with_a_clear_error() -> None:
    async with EventBus(publish_timeout=0.05, close_grace=0.1) as bus:
        gate = asyncio.Event()

        async def stuck(event: Event[Any]) -> None:
            await gate.wait()

        bus.subscribe("t", stuck, name="stuck", max_pending=1)
        await bus.publish("t", 1)
        await wait_until(lambda: bus.stats()["stuck"].in_flight == 1)
        await bus.publish("t", 2)
        with pytest.raises(PublishTimeoutError, match="'stuck'"):
            await bus.publish("t", 3)
        gate.set()
        await bus.drain(timeout=2)
        assert bus.stats()["stuck"].handled == 2


async def test_publishing_into_own_full_inbox_fails_instead_of_deadlocking(bus: EventBus) -> None:
    dead: list[Event[Any]] = []

    async def recursive(event: Event[int]) -> None:
        for n in range(3):
            await bus.publish("loop", event.payload + n + 1)

    bus.subscribe("_dlq.loop", dead.append, name="dlq")
    bus.subscribe("loop", recursive, name="recursive", max_pending=2)
    await bus.publish("loop", 1000)
    with pytest.raises(TimeoutError):
        # it publishes without end, but must never deadlock the loop
        await bus.drain(timeout=0.2)
    assert any("deadlock" in d.metadata["error"] for d in dead)


async def test_plain_function_handlers_run_in_threads() -> None:
    threads: list[str] = []
    loop_thread = threading.current_thread().name
    async with EventBus(close_grace=1) as bus:

        def blocking(event: Event[Any]) -> str:
            time.sleep(0.05)  # would stall the loop if run on it
            threads.append(threading.current_thread().name)
            return "done"

        ticks = 0

        async def ticker(event: Event[Any]) -> None:
            nonlocal ticks
            ticks += 1

        bus.subscribe("t", blocking, name="blocking")
        bus.subscribe("tick", ticker, name="ticker")
        await bus.publish("t", 1)
        for n in range(20):
            await bus.publish("tick", n)
        await wait_until(lambda: ticks == 20, timeout=1)
        assert threads == []  # the loop went on while the thread slept
        await bus.drain(timeout=2)
    assert threads
    assert threads[0] != loop_thread


async def test_publish_threadsafe_from_another_thread(bus: EventBus) -> None:
    seen: list[Event[Any]] = []
    bus.subscribe("t", seen.append, name="seen")
    results: list[Event[Any]] = []

    def from_thread() -> None:
        results.append(bus.publish_threadsafe("t", "hello", metadata={"via": "thread"}, timeout=2))

    thread = threading.Thread(target=from_thread)
    thread.start()
    await asyncio.to_thread(thread.join, 2)
    await bus.drain(timeout=2)
    assert [e.id for e in seen] == [results[0].id]
    assert seen[0].metadata["via"] == "thread"
    with pytest.raises(RuntimeError, match=r"await bus\.publish"):
        bus.publish_threadsafe("t", "from the loop")


async def test_publish_threadsafe_inside_sync_handler_keeps_causation(bus: EventBus) -> None:
    children: list[Event[Any]] = []

    def sync_handler(event: Event[Any]) -> None:
        bus.publish_threadsafe("child", event.payload + 1, timeout=2)

    async def child(event: Event[Any]) -> None:
        children.append(event)

    bus.subscribe("parent", sync_handler, name="sync-parent")
    bus.subscribe("child", child, name="child")
    parent = await bus.publish("parent", 1)
    await bus.drain(timeout=2)  # also proves drain waited for the thread's publish
    assert len(children) == 1
    assert children[0].causation_id == parent.id
    assert children[0].correlation_id == parent.correlation_id
    assert children[0].source == "sync-parent"


async def test_close_finishes_queued_work_within_grace() -> None:
    seen: list[int] = []
    bus = EventBus()

    async def handler(event: Event[int]) -> None:
        await asyncio.sleep(0.001)
        seen.append(event.payload)

    bus.subscribe("t", handler)
    async with bus:
        for n in range(20):
            await bus.publish("t", n)
    assert seen == list(range(20))


async def test_close_reports_unfinished_work_and_refuses_new_events() -> None:
    bus = EventBus()
    gate = asyncio.Event()
    follow_ups: list[Event[Any]] = []

    async def stuck(event: Event[int]) -> None:
        await gate.wait()

    async def quick_then_follow(event: Event[Any]) -> None:
        await asyncio.sleep(0.02)  # still running when close() begins
        await bus.publish("follow.up", event.payload)

    async def follow(event: Event[Any]) -> None:
        follow_ups.append(event)

    bus.subscribe("t", stuck, name="stuck")
    bus.subscribe("q", quick_then_follow, name="quick")
    bus.subscribe("follow.up", follow, name="follow")
    await bus.start()
    for n in range(3):
        await bus.publish("t", n)
    await bus.publish("q", "x")
    await wait_until(lambda: bus.stats()["stuck"].in_flight == 1)
    report = await bus.close(grace=0.2)
    assert not report.clean
    states = sorted((u.subscription, u.event.payload, u.state) for u in report.unhandled)
    assert states == [("stuck", 0, "in_flight"), ("stuck", 1, "queued"), ("stuck", 2, "queued")]
    assert [e.payload for e in follow_ups] == ["x"]  # in-flight work could still publish
    with pytest.raises(BusClosedError):
        await bus.publish("t", 99)
    assert await bus.close() is report


async def test_publish_before_start_is_a_clear_error() -> None:
    from eventwire import BusNotRunningError

    bus = EventBus()
    with pytest.raises(BusNotRunningError, match="async with bus"):
        await bus.publish("t", 1)


async def test_retries_do_not_run_inside_the_first_failures_context(bus: EventBus) -> None:
    import sys

    contexts: list[BaseException | None] = []
    raised: list[BaseException] = []

    async def handler(event: Event[Any]) -> None:
        contexts.append(sys.exc_info()[1])
        error = RuntimeError(f"attempt {len(contexts)}")
        raised.append(error)
        raise error

    bus.subscribe("t", handler, name="h", retry=Retry(attempts=3, backoff=0))
    await bus.publish("t", 1)
    await bus.drain(timeout=2)
    assert contexts == [None, None, None]
    assert [e.__context__ for e in raised] == [None, None, None]
