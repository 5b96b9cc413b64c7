"""Observers see every publish and every handling attempt, with the right outcome; a failing
observer never changes delivery; dead letters sent back with a target reach one subscription."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from eventwire import Event, EventBus, Retry
from eventwire.context import current_event
from eventwire.observe import HandlingRecord, Observer, set_trace_context
from eventwire.subscription import Subscription


class Log(Observer):
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.records: list[HandlingRecord] = []

    def publish_started(self, event: Event[Any]) -> Any:
        self.calls.append(("publish_started", event.topic))
        return f"token:{event.id}"

    def publish_finished(self, token: Any, event: Event[Any], error: BaseException | None) -> None:
        assert token == f"token:{event.id}"
        self.calls.append(
            ("publish_finished", event.topic, type(error).__name__ if error else None)
        )

    def attempt_started(self, subscription: Subscription, event: Event[Any], attempt: int) -> Any:
        # Runs in the handler's task, with the event being handled as the current one.
        assert current_event.get() is event
        self.calls.append(("attempt_started", subscription.name, attempt))
        return attempt

    def attempt_finished(
        self,
        token: Any,
        subscription: Subscription,
        event: Event[Any],
        record: HandlingRecord,
        error: BaseException | None,
    ) -> None:
        self.records.append(record)

    def dropped(self, subscription: Subscription, event: Event[Any]) -> None:
        self.calls.append(("dropped", subscription.name, event.payload))


async def test_attempts_report_handled_retrying_and_dead_lettered(bus: EventBus) -> None:
    log = bus.observe(Log())
    calls = 0

    async def flaky(event: Event[Any]) -> None:
        nonlocal calls
        calls += 1
        if event.payload == "always" or calls == 1:
            raise ValueError(f"boom {calls}")

    bus.subscribe("job", flaky, name="flaky", retry=Retry(attempts=2, backoff=0))
    await bus.publish("job", "once")
    await bus.publish("job", "always")
    await bus.drain(timeout=2)

    outcomes = [(r.attempt, r.outcome, r.error) for r in log.records if r.topic == "job"]
    assert outcomes == [
        (1, "retrying", "ValueError: boom 1"),
        (2, "handled", None),
        (1, "retrying", "ValueError: boom 3"),
        (2, "dead_lettered", "ValueError: boom 4"),
    ]
    assert all(r.subscription == "flaky" and r.seconds >= 0 for r in log.records)
    # The dead letter was published, and seen as a publish, in the same run.
    assert ("publish_finished", "_dlq.job", None) in log.calls


async def test_a_payload_that_fails_validation_is_recorded_as_attempt_zero(bus: EventBus) -> None:
    log = bus.observe(Log())

    async def typed(event: Event[int]) -> None: ...

    bus.subscribe("n", typed, name="typed")
    await bus.publish("n", "not a number")
    await bus.drain(timeout=2)
    [record] = [r for r in log.records if r.topic == "n"]
    assert (record.attempt, record.outcome, record.error_type) == (
        0,
        "dead_lettered",
        "PayloadValidationError",
    )


async def test_publish_errors_reach_the_observer(bus: EventBus) -> None:
    log = bus.observe(Log())
    bus.subscribe("full", _never_returns, name="stuck", max_pending=1, overflow="error")
    await bus.publish("full", 1)  # taken by the worker
    await _until(lambda: bus.stats()["stuck"].in_flight == 1)
    await bus.publish("full", 2)  # fills the inbox
    with pytest.raises(Exception, match="full"):
        await bus.publish("full", 3)
    assert ("publish_finished", "full", "InboxFullError") in log.calls


async def test_drops_are_reported(bus: EventBus) -> None:
    log = bus.observe(Log())
    bus.subscribe("d", _never_returns, name="dropper", max_pending=1, overflow="drop_oldest")
    await bus.publish("d", 1)
    await _until(lambda: bus.stats()["dropper"].in_flight == 1)
    await bus.publish("d", 2)
    await bus.publish("d", 3)  # drops 2
    assert ("dropped", "dropper", 2) in log.calls


async def test_a_failing_observer_is_logged_and_changes_nothing(
    bus: EventBus, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Observer):
        def publish_started(self, event: Event[Any]) -> Any:
            raise RuntimeError("observer bug")

        def attempt_started(self, subscription: Subscription, event: Event[Any], n: int) -> Any:
            raise RuntimeError("observer bug")

    bus.observe(Broken())
    log = bus.observe(Log())
    seen: list[Any] = []

    async def handler(event: Event[Any]) -> None:
        seen.append(event.payload)

    bus.subscribe("t", handler)
    await bus.publish("t", 1)
    await bus.drain(timeout=2)
    assert seen == [1]
    assert [r.outcome for r in log.records] == ["handled"]
    assert "observer bug" in caplog.text


async def test_unobserve_stops_the_calls(bus: EventBus) -> None:
    log = bus.observe(Log())
    assert bus.observers == (log,)
    bus.unobserve(log)
    bus.unobserve(log)  # no error the second time
    await bus.publish("nobody.listens", 1)
    assert log.calls == []
    with pytest.raises(TypeError, match="Observer"):
        bus.observe(object())  # type: ignore[type-var]


async def test_trace_context_set_at_publish_reaches_the_handler(bus: EventBus) -> None:
    class Stamp(Observer):
        def publish_started(self, event: Event[Any]) -> Any:
            set_trace_context(event, {"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"})

    bus.observe(Stamp())
    got: list[Any] = []

    async def handler(event: Event[Any]) -> None:
        got.append(dict(event.trace_context))

    bus.subscribe("t", handler)
    await bus.publish("t", 1)
    await bus.drain(timeout=2)
    assert got == [{"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"}]


async def test_without_observers_events_carry_no_trace_context(bus: EventBus) -> None:
    event = await bus.publish("t", 1)
    assert event.trace_context == {}
    assert event.target is None


async def test_a_targeted_event_reaches_only_its_subscription(bus: EventBus) -> None:
    seen: list[tuple[str, int]] = []

    def recorder(name: str) -> Any:
        async def handler(event: Event[Any]) -> None:
            seen.append((name, event.payload["n"]))

        return handler

    bus.subscribe("order.placed", recorder("billing"), name="billing")
    bus.subscribe("order.placed", recorder("shipping"), name="shipping")
    bus.subscribe("order.*", recorder("g1"), name="g1", group="analytics")
    bus.subscribe("order.*", recorder("g2"), name="g2", group="analytics")
    retried = Event("order.placed", {"n": 1}, target="shipping")
    await bus.publish(retried)
    to_group = Event("order.placed", {"n": 2}, target="analytics")
    await bus.publish(to_group)
    await bus.drain(timeout=10)
    # Different subscriptions run independently: in any order, each event reached only its
    # target (and one member of the group).
    assert sorted(seen) in ([("g1", 2), ("shipping", 1)], [("g2", 2), ("shipping", 1)])


def test_publishes_is_checked_and_kept() -> None:
    bus = EventBus()

    async def handler(event: Event[Any]) -> None: ...

    subscription = bus.subscribe("a", handler, publishes=["b.done", "b.done", "c.*"])
    assert subscription.publishes == ("b.done", "c.*")
    with pytest.raises(TypeError, match="list of topics"):
        bus.subscribe("a", handler, name="x", publishes="b.done")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"publishes= pattern 'bad\.\.topic' has an empty token"):
        bus.subscribe("a", handler, name="y", publishes=["bad..topic"])


async def test_topics_a_handler_publishes_are_learnt(bus: EventBus) -> None:
    async def research(event: Event[Any]) -> None:
        await bus.publish("research.complete", event.payload)
        await bus.publish_many([("research.audit", 1)])

    subscription = bus.subscribe("user.query", research, name="research")
    await bus.publish("user.query", "q")
    await bus.drain(timeout=2)
    assert subscription.published_topics == {"research.complete", "research.audit"}


async def test_stats_carry_handling_percentiles(bus: EventBus) -> None:
    release = asyncio.Event()

    async def handler(event: Event[Any]) -> None:
        if event.payload == "slow":
            await release.wait()

    bus.subscribe("p", handler, name="p")
    for _ in range(98):
        await bus.publish("p", "fast")
    await bus.publish("p", "slow")
    await _until(lambda: bus.stats()["p"].in_flight == 1 and bus.stats()["p"].handled == 98)
    await asyncio.sleep(0.05)  # the one slow event takes at least this long
    release.set()
    await bus.drain(timeout=2)
    handling = bus.stats()["p"].handling
    assert handling.count == 99
    assert handling.p50 < 0.05
    assert handling.max >= 0.05
    assert handling.p99 >= 0.05  # the 99th of 99 is the slow one


async def _never_returns(event: Event[Any]) -> None:
    await asyncio.Event().wait()


async def _until(condition: Any, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - state with no event to wait on
            await asyncio.sleep(0.001)


async def test_percentiles_count_every_event_of_a_fast_busy_subscription(bus: EventBus) -> None:
    async def fast(event: Event[Any]) -> None: ...

    bus.subscribe("fast", fast, name="fast")
    for n in range(5_000):
        await bus.publish("fast", n)
    await bus.drain(timeout=5)
    handling = bus.stats()["fast"].handling
    # Fast events are counted at their run's mean (one in 16 timed, to notice slow ones);
    # none is lost, and reading the stats counts in what waits to be recorded.
    assert handling.count == 5_000
    assert handling.p50 < 0.001


async def test_a_backlog_of_slow_handlers_is_timed_one_by_one(bus: EventBus) -> None:
    async def slow(event: Event[Any]) -> None:
        await asyncio.sleep(0.01)

    bus.subscribe("slow", slow, name="slow")
    for n in range(10):
        await bus.publish("slow", n)
    await bus.drain(timeout=5)
    handling = bus.stats()["slow"].handling
    assert handling.count == 10
    assert handling.p50 >= 0.01  # every one took at least 10 ms, so the median did too


async def test_agents_publishes_are_observed(bus: EventBus) -> None:
    from eventwire import Agent, on

    class Research(Agent):
        @on("user.query")
        async def research(self, event: Event[Any]) -> None:
            await self.publish("research.complete", event.payload)

    log = bus.observe(Log())
    bus.register(Research(name="research"))
    await bus.publish("user.query", "q")
    await bus.drain(timeout=2)
    assert ("publish_finished", "research.complete", None) in log.calls
