"""``partitions=N``: per-key order across the processes of a subscription, while processes
join and leave, on every durable backend (SQLite keeps it natively; the brokers through
partitions, see eventwire/backends/partitions.py). Each bus here stands for a process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest

from eventwire import Event, EventBus
from eventwire.backends.base import BackendCapabilityError
from eventwire.backends.partitions import assign, partition_of
from tests.conftest import wait_until

DURABLE = ("sqlite", "redis", "nats", "amqp")


@pytest.fixture(params=DURABLE)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def new_bus(url: str) -> EventBus:
    return EventBus(url, close_grace=2.0, redeliver_after=3.0)


class Pool:
    """What the processes of a pool handled, and whether a key ever ran in two at once."""

    def __init__(self) -> None:
        self.handled: list[tuple[str, int, int]] = []  # (key, number, which process)
        self.busy: set[str] = set()
        self.overlaps: list[str] = []

    def join(self, bus: EventBus, index: int, partitions: int = 6) -> None:
        async def work(event: Event[int]) -> None:
            key = event.key
            assert key is not None
            if key in self.busy:
                self.overlaps.append(key)
            self.busy.add(key)
            await asyncio.sleep(0.001)
            self.busy.discard(key)
            self.handled.append((key, event.payload, index))

        bus.subscribe(
            "orders.*",
            work,
            name=f"worker-{index}",
            group="pool",
            partitions=partitions,
            concurrency=4,
        )

    def numbers(self) -> set[int]:
        return {number for _, number, _ in self.handled}

    def by_key(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = defaultdict(list)
        for key, number, _ in self.handled:
            found[key].append(number)
        return found


async def test_keys_stay_in_order_while_processes_join_and_leave(bus_url: str) -> None:
    pool = Pool()
    first, second, third = new_bus(bus_url), new_bus(bus_url), new_bus(bus_url)
    for index, bus in enumerate((first, second, third)):
        pool.join(bus, index)
    publisher = new_bus(bus_url)
    async with publisher, first, second:
        total = 0

        async def publish(count: int) -> None:
            nonlocal total
            events = [
                Event("orders.placed", n, key=f"customer-{n % 12}")
                for n in range(total, total + count)
            ]
            await publisher.publish_many(events)
            total += count

        async def publish_until(condition: Callable[[], bool]) -> None:
            # A round of events (one per key) at a time, each handled before the next, until
            # `condition` holds: partitions move within a few ticks of the group's table.
            async with asyncio.timeout(30):
                while not condition():
                    await publish(12)
                    await wait_until(lambda: len(pool.numbers()) == total, timeout=20)

        def handled_by(index: int, since: int = 0) -> bool:
            return any(i == index for _, number, i in pool.handled if number >= since)

        await publish(300)
        await wait_until(lambda: len(pool.numbers()) >= 100, timeout=30)
        await publish_until(lambda: handled_by(0) and handled_by(1))
        await third.start()  # a process joins mid-stream: partitions move to it
        await publish(300)
        await publish_until(lambda: handled_by(2))
        await second.close()  # one leaves: its partitions go to the others
        left_at = total
        await publish(300)
        await publish_until(lambda: handled_by(0, left_at) and handled_by(2, left_at))
        await third.close()
    assert pool.overlaps == [], "no key ever ran in two processes at once"
    for key, numbers in pool.by_key().items():
        assert numbers == sorted(set(numbers)), f"{key} handled once each, in publish order"
    assert not handled_by(1, left_at), "the process that left handled nothing after it left"


async def test_events_without_a_key_spread_over_the_pool(bus_url: str) -> None:
    handled: dict[int, list[int]] = defaultdict(list)
    buses = [new_bus(bus_url) for _ in range(2)]
    for index, bus in enumerate(buses):

        async def work(event: Event[int], index: int = index) -> None:
            await asyncio.sleep(0.005)
            handled[index].append(event.payload)

        # Each process holds at most 5 at a time: the rest waits for whoever is free.
        bus.subscribe("jobs.*", work, name=f"w{index}", group="jobs", partitions=4, max_pending=5)
    async with buses[0], buses[1]:
        await buses[0].publish_many([("jobs.run", n) for n in range(200)])
        await wait_until(lambda: sum(map(len, handled.values())) == 200, timeout=30)
    assert sorted(handled[0] + handled[1]) == list(range(200))
    assert handled[0], "the first process took unkeyed events"
    assert handled[1], "so did the second"


async def test_another_partition_count_is_refused_with_both_named(bus_url: str) -> None:
    first, second = new_bus(bus_url), new_bus(bus_url)
    first.subscribe("t.x", lambda e: None, name="a", group="counted", partitions=4)
    second.subscribe("t.x", lambda e: None, name="b", group="counted", partitions=8)
    async with first:
        if first.backend.orders_keys_itself:  # type: ignore[attr-defined]
            pytest.skip("SQLite needs no partitions: partitions= changes nothing there")
        with pytest.raises(ValueError, match=r"split into 4 partitions.*not 8.*partitions=4"):
            async with second:
                pass


@pytest.mark.parametrize("backend_name", ["memory"])
async def test_in_one_process_partitions_change_nothing(bus_url: str) -> None:
    seen: list[tuple[str | None, int]] = []
    async with EventBus(bus_url) as bus:
        bus.subscribe("t.*", lambda e: seen.append((e.key, e.payload)), group="g", partitions=3)
        for n in range(20):
            await bus.publish("t.x", n, key=f"k{n % 3}" if n % 2 else None)
        await bus.drain(timeout=5)
    assert [n for _, n in seen] == list(range(20))


@pytest.mark.parametrize("bad", [0, -1, 1025, 2.0, "4", True])
def test_bad_partition_counts_are_refused(bad: Any) -> None:
    bus = EventBus()
    with pytest.raises(ValueError, match=r"partitions must be an int from 1 to 1024"):
        bus.subscribe("t.x", lambda e: None, partitions=bad)


@pytest.mark.parametrize("backend_name", ["redis"])
async def test_group_members_in_one_process_must_agree(bus_url: str) -> None:
    bus = new_bus(bus_url)
    bus.subscribe("t.x", lambda e: None, name="a", group="g", partitions=4)
    with pytest.raises(ValueError, match="partitions=4 in this process"):
        bus.subscribe("t.x", lambda e: None, name="b", group="g", partitions=2)


@pytest.mark.parametrize("backend_name", ["amqp"])
async def test_rabbitmq_names_where_handled_ids_can_go(bus_url: str) -> None:
    bare = bus_url.split("?")[0] + "?namespace=" + bus_url.rsplit("namespace=", 1)[1]
    bus = new_bus(bare)
    with pytest.raises(BackendCapabilityError, match=r"\?handled=sqlite:///"):
        bus.subscribe("t.x", lambda e: None, name="payer", idempotent=True)


def test_a_key_maps_to_the_same_partition_in_every_process() -> None:
    keys = [f"conversation-{n}" for n in range(200)]
    here = [partition_of(key, 16) for key in keys]
    script = (
        "from eventwire.backends.partitions import partition_of;"
        f"print([partition_of(k, 16) for k in {keys!r}])"
    )
    # Another interpreter, with another hash seed.
    elsewhere = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345"},
    ).stdout
    assert here == eval(elsewhere)
    assert len(set(here)) == 16, "200 keys reach every one of 16 partitions"


def test_slots_are_dealt_evenly_over_the_members() -> None:
    slots = ["router", *map(str, range(16))]
    for members in (["a"], ["b", "a"], ["c", "a", "b"], ["a", "b", "c", "d"]):
        dealt = assign(slots, members)
        counts = [list(dealt.values()).count(m) for m in members]
        assert max(counts) - min(counts) <= 1, counts
        assert dealt == assign(slots, list(reversed(members))), "same view, same deal"
