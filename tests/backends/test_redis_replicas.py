"""``redis://...?min_replicas=N``: a publish returns only once N replicas have the event (Redis's
WAIT), so a primary that dies the moment after loses none of it. A private primary and replica
of the test's own; the replica is paused with SIGSTOP to show that the wait is real."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from eventwire import Event, EventBus, ReplicationError
from tests.backends.helpers import collecting_bus
from tests.conftest import wait_until
from tests.services import PrivateServer, private_server, unique_namespace


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[PrivateServer, PrivateServer]]:
    (tmp_path / "primary").mkdir()
    (tmp_path / "replica").mkdir()
    with private_server("redis", tmp_path / "primary") as primary:
        replica_of = ("--replicaof", "127.0.0.1", str(primary.port))
        with private_server("redis", tmp_path / "replica", *replica_of) as replica:
            yield primary, replica


async def replicas_of(server: PrivateServer) -> int:
    client = Redis.from_url(server.url)
    try:
        info = await client.info("replication")
        return int(info.get("connected_slaves", 0))
    finally:
        await client.aclose()


@contextlib.contextmanager
def paused(server: PrivateServer) -> Iterator[None]:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


async def test_what_a_publish_returned_for_is_on_the_replica_when_the_primary_dies(
    pair: tuple[PrivateServer, PrivateServer],
) -> None:
    primary, replica = pair
    namespace = unique_namespace()
    await wait_until_replicated(primary)
    async with EventBus(f"{primary.url}?min_replicas=1&namespace={namespace}") as bus:
        for n in range(100):
            await bus.publish("replicated.one", n)  # the single-XADD path
        await bus.publish_many([Event("replicated.many", n) for n in range(100)])  # scripts
        primary.kill()  # at once: no time for replication to catch up after the returns

    # The replica is what a failover would promote; it holds every event published.
    promoted = Redis.from_url(replica.url)
    try:
        await promoted.replicaof("NO", "ONE")
    finally:
        await promoted.aclose()
    url = f"{replica.url}?namespace={namespace}"
    reader, handled = collecting_bus(url, "replicated.*", "reader", start="earliest")
    async with reader:
        await wait_until(lambda: len(handled) == 200, timeout=30)
    assert sorted(handled) == sorted([*range(100), *range(100)])


async def test_a_publish_no_replica_confirms_raises_and_publishing_again_succeeds(
    pair: tuple[PrivateServer, PrivateServer],
) -> None:
    primary, replica = pair
    await wait_until_replicated(primary)
    url = f"{primary.url}?min_replicas=1&replica_wait=300ms&dedup_window=60"
    url += f"&namespace={unique_namespace()}"
    bus, handled = collecting_bus(url, "replicated.wait", "waiter")
    async with bus:
        event = Event("replicated.wait", "once")
        with paused(replica), pytest.raises(ReplicationError, match=r"0 of min_replicas=1 re"):
            await bus.publish(event)
        # What the error says to do: publish the same event again (stored once) until the
        # replica, running again, has caught up and confirms it.
        async with asyncio.timeout(30):
            while True:
                try:
                    await bus.publish(event)
                    break
                except ReplicationError:
                    continue
        await bus.publish("replicated.wait", "after")
        await wait_until(lambda: handled[-1:] == ["after"], timeout=10)
    assert handled == ["once", "after"]


async def wait_until_replicated(primary: PrivateServer) -> None:
    """Until the replica has connected to the primary."""
    async with asyncio.timeout(30):
        while await replicas_of(primary) < 1:  # noqa: ASYNC110 - the server has no event
            await asyncio.sleep(0.05)
