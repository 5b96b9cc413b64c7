"""The sqlite:// backend's consumer (`eventwire.backends.sqlite`): what only it has. It
fetches without looking again when nothing was published since it found nothing, and it
acknowledges after a short linger; neither may hide work or undo an acknowledgement. The
contract every backend keeps is in test_backend_contract.py."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from eventwire import Event, EventBus
from eventwire.backends import open_backend, sqlite
from eventwire.backends.base import Backend, ConsumerSpec
from eventwire.backends.sqlite_log import SqliteLog
from tests.backends.helpers import bodies, fetch_all, messages_on


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/bus.db?poll=50ms"


async def opened(url: str) -> Backend:
    """A connected backend: another process on the same file."""
    backend = open_backend(url)
    assert backend is not None
    await backend.connect()
    return backend


async def test_a_fetch_after_finding_nothing_sees_another_process_publish(url: str) -> None:
    here, there = await opened(url), await opened(url)
    spec = ConsumerSpec("seen", "s")
    consumer = await here.consumer(spec)
    try:
        assert await consumer.fetch(5, 0) == []
        await there.publish(messages_on("s", "1"))
        # Not waiting: it looks all the same, although nothing was published here.
        assert bodies(await consumer.fetch(5, 0)) == ["1"]
        assert await consumer.fetch(5, 0) == []
        await there.publish(messages_on("s", "2"))
        started = time.monotonic()
        assert bodies(await consumer.fetch(5, 5.0)) == ["2"]
        assert time.monotonic() - started < 2.0  # a poll (50 ms) away, not the whole wait
    finally:
        await consumer.close()
        for backend in (here, there):
            await backend.close()


async def test_an_acknowledgement_on_its_way_at_close_is_not_given_back(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite, "_ACK_LINGER", 0.3)  # long enough to close meanwhile
    backend = await opened(url)
    spec = ConsumerSpec("landing", "l", ack_wait=30)
    consumer = await backend.consumer(spec)
    staying = await backend.consumer(spec)
    try:
        await backend.publish(messages_on("l", "1", "2"))
        done, left = await fetch_all(consumer, 2)
        acking = asyncio.get_running_loop().create_task(consumer.ack([done]))
        await asyncio.sleep(0)  # the acknowledgement has started, and lingers
        await consumer.close()  # gives back what it still holds: `left` alone
        assert acking.done()
        again = await staying.fetch(5, 0)
        assert bodies(again) == bodies([left])
        await staying.ack(again)
        assert await staying.fetch(5, 0.2) == []
    finally:
        await staying.close()
        await backend.close()


async def test_a_process_stopped_past_its_lease_leaves_the_key_to_the_one_that_took_it(
    tmp_path: Path,
) -> None:
    # Bus A's loop stops (a handler blocks it: as SIGSTOP would) holding "1" and "2" of key
    # "k" past their lease; another process (a thread on the log) leases "1" meanwhile. Once
    # A runs again it must not handle "2" while the other process still works on "1".
    path = tmp_path / "bus.db"
    url = f"sqlite:///{path}?poll=50ms"
    async with EventBus(url) as publisher:
        first_id = (await publisher.publish("jobs", 1, key="k")).id
        await publisher.publish("jobs", 2, key="k")
    frozen, thaw, decided, other_done = (threading.Event() for _ in range(4))
    seen: list[tuple[int, bool]] = []  # (payload, whether the other process finished "1")
    second = asyncio.Event()

    async def handle(event: Event[int]) -> None:
        if event.payload == 1 and not frozen.is_set():
            frozen.set()
            thaw.wait(30)  # blocks A's whole loop: no extends, no fetches
            # Runs once the worker has made up its mind about "2" (and started it, if so).
            asyncio.get_running_loop().call_soon(decided.set)
            return
        seen.append((event.payload, other_done.is_set()))
        if event.payload == 2:
            second.set()

    def other_process() -> None:
        frozen.wait(30)
        log = SqliteLog(path)
        try:
            while not (taken := log.fetch("workers", "other", limit=1)):
                time.sleep(0.05)  # until A's lease runs out: nothing to wait on but time
            assert [item.event_id for item in taken] == [first_id]
            thaw.set()
            decided.wait(30)
            log.ack("workers", [taken[0].seq], "other", keys=["k"])
            other_done.set()
        finally:
            thaw.set()
            log.close()

    async with EventBus(url, redeliver_after=1.0) as bus:
        bus.subscribe("jobs", handle, group="workers", start="earliest")
        other = asyncio.create_task(asyncio.to_thread(other_process))
        async with asyncio.timeout(30):
            await second.wait()
        await other
    assert seen == [(2, True)]  # "2" only after "1" was done elsewhere: never both at once


async def test_percent_escapes_in_the_path_are_decoded_as_in_any_url(tmp_path: Path) -> None:
    async with EventBus(f"sqlite:///{tmp_path}/my%20bus%23.db") as bus:
        await bus.publish("t.x", 1)
    names = await asyncio.to_thread(os.listdir, tmp_path)
    assert "my bus#.db" in names
    assert not [name for name in names if "%" in name]


MANY = 2_000


class Calls:
    """Counts calls made in worker threads; `reached` waits for a count on the loop."""

    def __init__(self) -> None:
        self.count = 0
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()

    def wrap(self, method: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            self._loop.call_soon_threadsafe(self._changed.set)
            return method(*args, **kwargs)

        return counted

    async def reached(self, count: int) -> None:
        while self.count < count:
            self._changed.clear()
            await self._changed.wait()


async def test_many_idle_subscriptions_do_not_each_query(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Idle subscriptions cost one read per poll for all of them (the watch), not a query per
    # subscription per poll: counted over five of those polls, the subscriptions make no
    # lease calls at all (before, each made one every poll: some 10,000 here).
    leases, looks = Calls(), Calls()
    monkeypatch.setattr(SqliteLog, "lease", leases.wrap(SqliteLog.lease))
    monkeypatch.setattr(SqliteLog, "changes", looks.wrap(SqliteLog.changes))

    async def handle(event: Event[Any]) -> None:
        return None

    bus = EventBus(url)
    for number in range(MANY):
        bus.subscribe(f"many.{number}", handle, name=f"s{number}")
    async with bus:
        async with asyncio.timeout(60):
            await leases.reached(MANY)  # each subscription's first lease: all is quiet after
            idle_from = leases.count
            await looks.reached(looks.count + 5)
        assert leases.count - idle_from < MANY // 100


async def test_an_event_from_another_process_reaches_its_one_of_many_subscriptions(
    url: str,
) -> None:
    got: list[tuple[str, int]] = []
    arrived = asyncio.Event()

    def handler(name: str) -> Any:
        async def handle(event: Event[int]) -> None:
            got.append((name, event.payload))
            arrived.set()

        return handle

    bus = EventBus(url)
    for number in range(MANY):
        bus.subscribe(f"many.{number}", handler(f"s{number}"), name=f"s{number}")
    bus.subscribe("many.*", handler("all"), name="all")
    async with bus:
        async with EventBus(url) as other:  # another process on the same file
            for number in (1234, 7):
                await other.publish(f"many.{number}", number)
        async with asyncio.timeout(30):
            while len(got) < 4:
                await arrived.wait()
                arrived.clear()
        await bus.drain(timeout=30)
    assert sorted(got) == [("all", 7), ("all", 1234), ("s1234", 1234), ("s7", 7)]


async def test_a_lease_of_a_dead_process_runs_out_and_comes_to_a_waiting_subscription(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing in this process changes when another process's lease runs out: the watch
    # notices the delivery became visible, and wakes the one subscription it is for (not
    # only its slow sweep, put off here past the test's timeout).
    monkeypatch.setattr(sqlite, "_WATCH_SWEEP", 3600.0)
    path = tmp_path / "bus.db"
    url = f"sqlite:///{path}?poll=50ms"
    dead = SqliteLog(path)  # another process, which leases the event, then dies
    try:
        dead.ensure_consumer("workers", "jobs", "earliest", group=True)
        async with EventBus(url) as publisher:
            await publisher.publish("jobs", 1)
        [taken] = dead.fetch("workers", "gone", limit=1, lease_seconds=1.0)
    finally:
        dead.close()
    got: list[int] = []
    came = asyncio.Event()

    async def handle(event: Event[int]) -> None:
        got.append(event.payload)
        came.set()

    async def idle(event: Event[Any]) -> None:
        return None

    bus = EventBus(url)
    for number in range(50):
        bus.subscribe(f"other.{number}", idle, name=f"o{number}")
    bus.subscribe("jobs", handle, group="workers")
    async with bus:
        async with asyncio.timeout(30):
            await came.wait()
    assert (taken.attempts, got) == (1, [1])
