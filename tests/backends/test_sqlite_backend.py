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
