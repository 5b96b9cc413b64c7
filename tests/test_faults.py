"""Faults and races: cancellation, unsubscribing mid-publish, interrupted shutdown, stuck
threads. Each test reproduces a failure mode found in review and fails without its fix."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from pydantic import BaseModel

import eventwire.subscription as subscription_module
from eventwire import (
    Agent,
    BusClosedError,
    Event,
    EventBus,
    HandlerError,
    PublishTimeoutError,
)

from .conftest import wait_until


async def test_handler_raising_cancelled_error_is_a_failure_not_a_dead_worker(
    bus: EventBus,
) -> None:
    handled: list[int] = []

    async def handler(event: Event[int]) -> int:
        if event.payload == 0:
            inner = asyncio.get_running_loop().create_future()
            inner.cancel()
            await inner  # something the handler awaited was cancelled
        handled.append(event.payload)
        return event.payload

    bus.subscribe("t", handler, name="h")
    for n in range(3):
        await bus.publish("t", n)
    await bus.drain(timeout=2)
    assert handled == [1, 2]
    assert bus.stats()["h"].dead_lettered == 1
    assert await bus.request("t", 5, timeout=2) == 5  # the worker is alive


async def test_a_worker_cancelled_from_outside_is_reported_not_lost_in_silence(
    bus: EventBus, caplog: pytest.LogCaptureFixture
) -> None:
    started = asyncio.Event()

    async def handler(event: Event[int]) -> None:
        started.set()
        await asyncio.Event().wait()

    subscription = bus.subscribe("t", handler, name="stuck")
    await bus.publish("t", 1)
    await bus.publish("t", 2)
    await asyncio.wait_for(started.wait(), 2)
    (worker,) = subscription.workers
    worker.cancel()  # as a stray cancellation would, or a loop stopped before the bus closed
    await asyncio.wait([worker], timeout=2)
    reports = [r.getMessage() for r in caplog.records if "worker of stuck" in r.getMessage()]
    assert len(reports) == 1
    assert "was cancelled while the subscription ran" in reports[0]
    assert "0 of its 1 workers go on, with 1 queued event(s)" in reports[0]


async def test_workers_cancelled_together_are_reported_once(
    bus: EventBus, caplog: pytest.LogCaptureFixture
) -> None:
    # As when the event loop is stopped with the bus still open: one line, not one a worker.
    async def handler(event: Event[int]) -> None:
        await asyncio.Event().wait()

    subscription = bus.subscribe("t", handler, name="many", concurrency=3)
    for n in range(3):
        await bus.publish("t", n)
    await wait_until(lambda: bus.stats()["many"].in_flight == 3)
    for worker in subscription.workers:
        worker.cancel()
    await asyncio.wait(subscription.workers, timeout=2)
    reports = [r for r in caplog.records if "worker of many" in r.getMessage()]
    assert len(reports) == 1


async def test_a_worker_stopped_by_an_error_of_eventwire_is_reported(
    bus: EventBus, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("a bug in the worker loop")

    # Where the worker goes idle after an event, outside any handler's error handling.
    monkeypatch.setattr(subscription_module._RunTimer, "end", broken)
    subscription = bus.subscribe("t", lambda event: None, name="broken")
    await bus.publish("t", 1)
    (worker,) = subscription.workers
    await asyncio.wait([worker], timeout=2)
    (report,) = [r for r in caplog.records if "worker of broken" in r.getMessage()]
    assert report.levelname == "ERROR"
    assert "stopped on an error" in report.getMessage()
    assert report.exc_info is not None
    assert str(report.exc_info[1]) == "a bug in the worker loop"


async def test_publish_cancelled_just_after_admission_keeps_drain_honest(bus: EventBus) -> None:
    gates = {n: asyncio.get_running_loop().create_future() for n in range(3)}
    handled: list[int] = []
    blocked: asyncio.Task[Any] | None = None

    async def handler(event: Event[int]) -> None:
        if event.payload == 1 and blocked is not None:
            blocked.cancel()  # event 2 was let in a moment ago; its publisher is cancelled
        await gates[event.payload]
        handled.append(event.payload)

    bus.subscribe("t", handler, name="h", max_pending=1)
    await bus.publish("t", 0)
    await wait_until(lambda: bus.stats()["h"].in_flight == 1)
    await bus.publish("t", 1)
    blocked = asyncio.ensure_future(bus.publish("t", 2))
    await wait_until(lambda: bus.stats()["h"].queued == 2)
    gates[0].set_result(None)
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert bus.owed == 2  # event 1 in flight, event 2 queued: admitted, so still owed
    draining = asyncio.ensure_future(bus.drain(timeout=2))
    gates[1].set_result(None)
    await asyncio.sleep(0.01)
    assert not draining.done()  # event 2 is still owed
    gates[2].set_result(None)
    await draining
    assert handled == [0, 1, 2]


async def test_unsubscribing_a_target_of_a_stalled_publish(bus: EventBus) -> None:
    gate = asyncio.Event()
    seen_b: list[int] = []

    async def slow_a(event: Event[int]) -> None:
        await gate.wait()

    async def b(event: Event[int]) -> None:
        seen_b.append(event.payload)

    bus.subscribe("t", slow_a, name="a", max_pending=1)
    sub_b = bus.subscribe("t", b, name="b")
    await bus.publish("t", 0)
    await wait_until(lambda: bus.stats()["a"].in_flight == 1)
    await bus.publish("t", 1)
    stalled = asyncio.ensure_future(bus.publish("t", 2))  # waits on a, then goes to b
    await wait_until(lambda: bus.stats()["a"].queued == 2)
    await sub_b.unsubscribe()
    gate.set()
    await asyncio.wait_for(stalled, 2)
    await bus.drain(timeout=2)  # nothing is owed to the removed subscription
    assert seen_b == [0, 1]
    report = await bus.close(grace=1)
    assert report.clean


async def test_unsubscribe_without_drain_releases_blocked_publishers(bus: EventBus) -> None:
    gate = asyncio.Event()

    async def stuck(event: Event[int]) -> None:
        await gate.wait()

    sub = bus.subscribe("t", stuck, name="stuck", max_pending=1)
    await bus.publish("t", 0)
    await wait_until(lambda: bus.stats()["stuck"].in_flight == 1)
    await bus.publish("t", 1)
    blocked = asyncio.ensure_future(bus.publish("t", 2))
    await wait_until(lambda: bus.stats()["stuck"].queued == 2)
    unsubscribing = asyncio.ensure_future(sub.unsubscribe(drain=False))
    await asyncio.wait_for(blocked, 1)  # released at once, not after publish_timeout
    gate.set()
    await asyncio.wait_for(unsubscribing, 2)
    await bus.drain(timeout=2)


async def test_drain_sees_publishes_from_tasks_a_handler_spawned(bus: EventBus) -> None:
    go = asyncio.Event()
    child_gate = asyncio.Event()
    spawned: list[asyncio.Task[Any]] = []
    children: list[int] = []

    async def later(value: int) -> None:
        await go.wait()
        await bus.publish("child", value)

    async def parent(event: Event[int]) -> None:
        spawned.append(asyncio.create_task(later(event.payload)))

    async def child(event: Event[int]) -> None:
        await child_gate.wait()
        children.append(event.payload)

    bus.subscribe("parent", parent)
    bus.subscribe("child", child)
    await bus.publish("parent", 7)
    await bus.drain(timeout=2)
    await bus.drain(timeout=2)  # retires the parent's settled epoch
    go.set()
    await asyncio.wait_for(spawned[0], 2)
    draining = asyncio.ensure_future(bus.drain(timeout=2))
    await asyncio.sleep(0.01)
    assert not draining.done()  # the child is owed
    child_gate.set()
    await draining
    assert children == [7]


async def test_own_inbox_deadlock_is_refused_with_several_workers() -> None:
    async with EventBus(publish_timeout=None, close_grace=0.5) as bus:
        dead: list[Event[Any]] = []

        async def fan(event: Event[int]) -> None:
            for n in range(4):
                await bus.publish("self", event.payload * 10 + n)

        bus.subscribe("_dlq.self", dead.append, name="dlq")
        bus.subscribe("self", fan, name="self-pub", concurrency=2, max_pending=2)
        await bus.publish("self", 1)
        with pytest.raises(TimeoutError):
            await bus.drain(timeout=0.3)  # it publishes without end, but never deadlocks
        assert any("would deadlock" in d.metadata["error"] for d in dead)


async def test_drop_oldest_never_blocks_when_keys_fill_the_room(bus: EventBus) -> None:
    gate = asyncio.Event()
    handled: list[int] = []

    async def handler(event: Event[int]) -> None:
        await gate.wait()
        handled.append(event.payload)

    sub = bus.subscribe(
        "k", handler, name="k", concurrency=2, max_pending=2, overflow="drop_oldest"
    )
    await bus.publish("k", 0, key="a")
    await wait_until(lambda: bus.stats()["k"].in_flight == 1)
    for n in (1, 2):  # the free worker parks these behind key "a": the room is used up
        await bus.publish("k", n, key="a")
    await wait_until(lambda: not sub.inbox and sub.inbox.capacity == 0)
    for n in range(3, 7):
        await asyncio.wait_for(bus.publish("k", n, key="a"), 1)
    assert bus.stats()["k"].dropped == 4
    gate.set()
    await bus.drain(timeout=2)
    assert handled == [0, 5, 6]


async def test_stuck_plain_handler_does_not_starve_other_plain_handlers(bus: EventBus) -> None:
    release = threading.Event()
    healthy: list[int] = []

    def stuck(event: Event[int]) -> None:
        release.wait(5)

    def fine(event: Event[int]) -> None:
        healthy.append(event.payload)

    bus.subscribe("stuck", stuck, name="stuck", timeout=0.01)
    bus.subscribe("fine", fine, name="fine")
    try:
        for n in range(40):  # more abandoned calls than any shared pool has threads
            await bus.publish("stuck", n)
        await wait_until(lambda: bus.stats()["stuck"].dead_lettered >= 8, timeout=5)
        for n in range(10):
            await bus.publish("fine", n)
        await wait_until(lambda: len(healthy) == 10, timeout=2)
    finally:
        release.set()
    await bus.drain(timeout=10)


async def test_timed_out_plain_handler_never_overlaps_the_next_call(bus: EventBus) -> None:
    release = threading.Event()
    running = 0
    peak = 0
    lock = threading.Lock()

    def handler(event: Event[int]) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        if event.payload == 0:
            release.wait(5)
        with lock:
            running -= 1

    bus.subscribe("t", handler, name="h", timeout=0.02)
    for n in range(3):
        await bus.publish("t", n)
    await wait_until(lambda: bus.stats()["h"].dead_lettered >= 1, timeout=2)
    release.set()
    await bus.drain(timeout=5)
    assert peak == 1


async def test_close_interrupted_during_grace_still_closes() -> None:
    bus = EventBus()
    gate = asyncio.Event()

    async def stuck(event: Event[Any]) -> None:
        await gate.wait()

    bus.subscribe("t", stuck, name="stuck")
    await bus.start()
    await bus.publish("t", 1)
    await wait_until(lambda: bus.stats()["stuck"].in_flight == 1)
    closing = asyncio.ensure_future(bus.close(grace=10))
    await asyncio.sleep(0.01)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    report = await asyncio.wait_for(bus.close(), 1)
    assert [u.state for u in report.unhandled] == ["in_flight"]
    with pytest.raises(BusClosedError):
        await bus.publish("t", 2)


async def test_close_reports_subscriptions_still_draining_after_unsubscribe() -> None:
    bus = EventBus()
    gate = asyncio.Event()

    async def leaving(event: Event[int]) -> None:
        if event.payload == 0:
            await bus.subscriptions["leaving"].unsubscribe()
        await gate.wait()

    bus.subscribe("t", leaving, name="leaving")
    await bus.start()
    for n in range(3):
        await bus.publish("t", n)
    await wait_until(lambda: "leaving" not in bus.subscriptions)
    report = await bus.close(grace=0.05)
    assert sorted(u.event.payload for u in report.unhandled) == [0, 1, 2]


async def test_publish_threadsafe_timeout_and_closed_errors() -> None:
    bus = EventBus()
    gate = asyncio.Event()
    seen: list[Any] = []

    async def stuck(event: Event[Any]) -> None:
        seen.append(event.payload)
        await gate.wait()

    bus.subscribe("t", stuck, name="stuck", max_pending=1)
    async with bus:
        await bus.publish("t", 0)
        await wait_until(lambda: bus.stats()["stuck"].in_flight == 1)
        await bus.publish("t", 1)

        def from_thread() -> BaseException | None:
            try:
                bus.publish_threadsafe("t", "from-thread", timeout=0.1)
            except BaseException as error:
                return error
            return None

        error = await asyncio.to_thread(from_thread)
        assert isinstance(error, PublishTimeoutError)
        assert "was not queued within 0.1s" in str(error)
        gate.set()
        await bus.drain(timeout=2)
        assert "from-thread" not in seen  # withdrawn, as the error said
    with pytest.raises(BusClosedError):
        await asyncio.to_thread(bus.publish_threadsafe, "t", 1)


async def test_request_whose_delivery_is_dropped_fails_fast(bus: EventBus) -> None:
    gate = asyncio.Event()

    async def service(event: Event[Any]) -> str:
        await gate.wait()
        return "ok"

    bus.subscribe("svc", service, name="svc", max_pending=1, overflow="drop_oldest")
    await bus.publish("svc", "occupy")
    await wait_until(lambda: bus.stats()["svc"].in_flight == 1)
    request = asyncio.ensure_future(bus.request("svc", "r", timeout=30))
    await wait_until(lambda: bus.stats()["svc"].queued == 1)
    await bus.publish("svc", "pushes the request out")
    with pytest.raises(HandlerError, match="dropped the request"):
        await asyncio.wait_for(request, 1)
    gate.set()
    await bus.drain(timeout=2)


async def test_drain_learns_when_close_abandons_work() -> None:
    bus = EventBus()
    gate = asyncio.Event()

    async def stuck(event: Event[Any]) -> None:
        await gate.wait()

    bus.subscribe("t", stuck)
    await bus.start()
    await bus.publish("t", 1)
    draining = asyncio.ensure_future(bus.drain())
    await bus.close(grace=0.05)
    with pytest.raises(BusClosedError, match="unhandled"):
        await asyncio.wait_for(draining, 1)


def test_handlers_of_modules_that_import_event_only_for_type_checking() -> None:
    namespace: dict[str, Any] = {}
    exec(  # a module with `if TYPE_CHECKING: from eventwire import Event`
        "from __future__ import annotations\n"
        "async def bare(event: Event) -> None: ...\n"
        "async def anything(event: Event[Any]) -> None: ...\n",
        namespace,
    )
    bus = EventBus()
    assert bus.subscribe("t", namespace["bare"], name="bare")
    assert bus.subscribe("t", namespace["anything"], name="anything")


class Strict(BaseModel):
    value: int

    def model_post_init(self, context: Any) -> None:
        if self.value < 0:
            raise TypeError("negative values are not allowed")  # not a ValidationError


async def test_validator_errors_of_any_kind_go_to_dlq_without_retry(bus: EventBus) -> None:
    from eventwire import Retry

    calls: list[int] = []
    dead: list[Event[Any]] = []

    async def handler(event: Event[Strict]) -> None:
        calls.append(event.payload.value)

    bus.subscribe("_dlq.v", dead.append, name="dlq")
    bus.subscribe("v", handler, name="typed", retry=Retry(attempts=3, backoff=0))
    await bus.publish("v", {"value": -1})
    await bus.drain(timeout=2)
    assert calls == []
    assert dead[0].metadata["attempts"] == 0
    assert "negative values" in dead[0].metadata["error"]
    assert bus.stats()["typed"].retried == 0


async def test_agents_can_publish_from_on_stop() -> None:
    farewells: list[Event[Any]] = []

    class Polite(Agent):
        async def on_stop(self) -> None:
            await self.publish("agent.stopped", self.name)

    bus = EventBus()
    bus.subscribe("agent.stopped", farewells.append, name="farewells")
    bus.register(Polite("polite"))
    async with bus:
        pass
    assert [e.payload for e in farewells] == ["polite"]


async def test_unsubscribe_without_drain_discards_events_parked_behind_keys(
    bus: EventBus,
) -> None:
    gate = asyncio.Event()
    handled: list[int] = []

    async def handler(event: Event[int]) -> None:
        await gate.wait()
        handled.append(event.payload)

    sub = bus.subscribe("k", handler, name="k", concurrency=2)
    for n in range(4):
        await bus.publish("k", n, key="same")
    await wait_until(lambda: bus.stats()["k"].in_flight == 1 and bus.stats()["k"].queued == 3)
    unsubscribing = asyncio.ensure_future(sub.unsubscribe(drain=False))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(unsubscribing, 2)
    assert handled == [0]
    assert sub.stats.dropped == 3


async def test_forwarding_a_replaced_event_gets_a_new_id(bus: EventBus) -> None:
    forwarded: list[Event[Any]] = []

    async def forward(event: Event[Any]) -> None:
        await bus.publish(event.replace(topic="forwarded"))

    bus.subscribe("original", forward)
    bus.subscribe("forwarded", forwarded.append, name="sink")
    original = await bus.publish("original", 1)
    await bus.drain(timeout=2)
    assert forwarded[0].id != original.id
    assert forwarded[0].causation_id == original.id
    assert forwarded[0].correlation_id == original.correlation_id
