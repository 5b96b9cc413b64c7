from __future__ import annotations

from typing import Any

import pytest

from eventwire import BusClosedError, Event, EventBus, Retry


def test_memory_url_is_the_default() -> None:
    assert EventBus().url == EventBus("memory://").url == "memory://"


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("", "non-empty"),
        ("localhost:4222", "malformed bus URL"),
        ("kafka://x:9092", "unknown bus URL scheme 'kafka'"),
        ("sqlite://", "names no file"),
        ("sqlite:///x.db?poll=-1", "poll= .* must be > 0"),
        ("sqlite:///x.db?namespace=a.b", "namespace 'a.b'"),
    ],
)
def test_bad_urls_are_rejected(url: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        EventBus(url)


def test_decorator_returns_the_function_and_registers_it() -> None:
    bus = EventBus()

    @bus.subscribe("user.query")
    async def audit(event: Event[Any]) -> None: ...

    assert callable(audit)
    assert audit.__name__ == "audit"
    name = f"{__name__}.test_decorator_returns_the_function_and_registers_it.<locals>.audit"
    assert bus.subscriptions[name].handler is audit
    assert audit.__eventwire_subscription__ is bus.subscriptions[name]  # type: ignore[attr-defined]


def test_default_names_are_made_unique_but_explicit_duplicates_fail() -> None:
    bus = EventBus()

    async def handler(event: Event[Any]) -> None: ...

    first = bus.subscribe("a", handler)
    second = bus.subscribe("b", handler)
    assert second.name == f"{first.name}#2"
    bus.subscribe("a", handler, name="explicit")
    with pytest.raises(ValueError, match="'explicit' already exists"):
        bus.subscribe("b", handler, name="explicit")


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"concurrency": 0}, "concurrency must be an int >= 1"),
        ({"max_pending": 0}, "max_pending must be an int >= 1"),
        ({"overflow": "spill"}, "overflow must be one of"),
        ({"timeout": 0}, "timeout must be > 0"),
        ({"group": ""}, "group must be a non-empty str"),
        ({"name": ""}, "name must be a non-empty str"),
        ({"max_restarts": 0}, "max_restarts must be an int >= 1 or None"),
        ({"max_restarts": True}, "max_restarts must be an int >= 1 or None"),
    ],
)
def test_bad_subscribe_options_are_named(options: dict[str, Any], fragment: str) -> None:
    async def handler(event: Event[Any]) -> None: ...

    with pytest.raises(ValueError, match=fragment):
        EventBus().subscribe("t", handler, **options)


def test_bad_handlers_are_rejected() -> None:
    bus = EventBus()
    with pytest.raises(TypeError, match="must be callable"):
        bus.subscribe("t", "not a function")  # type: ignore[call-overload]

    async def two_args(event: Event[Any], other: int) -> None: ...

    with pytest.raises(TypeError, match="one positional argument"):
        bus.subscribe("t", two_args)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Retry"):
        bus.subscribe("t", lambda e: None, retry=3)  # type: ignore[arg-type]


def test_retry_validation_and_backoff() -> None:
    with pytest.raises(ValueError, match="attempts"):
        Retry(attempts=0)
    with pytest.raises(ValueError, match="waits must be >= 0"):
        Retry(backoff=-1)
    policy = Retry(attempts=5, backoff=0.1, max_backoff=0.3)
    assert [policy.delay(n) for n in range(1, 5)] == pytest.approx([0.1, 0.2, 0.3, 0.3])
    jittered = Retry(backoff=1.0, jitter=0.5)
    assert all(0.5 <= jittered.delay(1) <= 1.5 for _ in range(50))


async def test_closed_bus_cannot_restart_or_subscribe() -> None:
    bus = EventBus()
    async with bus:
        pass
    with pytest.raises(BusClosedError, match="create a new one"):
        await bus.start()
    with pytest.raises(BusClosedError):
        bus.subscribe("t", lambda e: None)


async def test_close_from_inside_a_handler_is_refused(bus: EventBus) -> None:
    async def closer(event: Event[Any]) -> None:
        await bus.close()

    bus.subscribe("t", closer, name="closer")
    async with bus.record() as seen:
        await bus.publish("t", 1)
        [gave_up] = await seen.wait_handled("closer", outcome="dead_lettered", timeout=2)
    assert "signal your main task" in str(gave_up.error)
    assert bus.running


async def test_stats_snapshot(bus: EventBus) -> None:
    async def handler(event: Event[Any]) -> None: ...

    bus.subscribe("t", handler, name="h")
    for n in range(3):
        await bus.publish("t", n)
    await bus.drain(timeout=2)
    stats = bus.stats()["h"]
    assert (stats.handled, stats.queued, stats.in_flight, stats.pattern) == (3, 0, 0, "t")
    assert stats.mean_handling_seconds >= 0
    assert stats.handling_seconds >= 0


async def test_a_group_left_by_its_last_member_frees_its_name() -> None:
    async def handle(event: Event[Any]) -> None:
        return None

    bus = EventBus()
    first = bus.subscribe("a.*", handle, name="analytics-1", group="analytics")
    second = bus.subscribe("a.*", handle, name="analytics-2", group="analytics")
    await first.unsubscribe()
    with pytest.raises(ValueError, match="group of subscription 'analytics-2'"):
        bus.subscribe("a.*", handle, name="analytics")  # the group still has a member
    await second.unsubscribe()
    assert bus.subscribe("a.*", handle, name="analytics").name == "analytics"
