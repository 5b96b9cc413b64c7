"""The nats:// backend against a real NATS JetStream server (and a private one it restarts)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import nats
import nats.js.errors
import pytest

from eventwire.backends import parse_url
from eventwire.backends.base import (
    BackendConnectionError,
    ConsumerInfo,
    ConsumerSpec,
    Message,
)
from eventwire.backends.nats import NatsBackend
from eventwire.errors import EventwireError
from tests.backends.helpers import bodies, connect_error, fetch_all, messages_on
from tests.services import (
    PrivateServer,
    free_port,
    private_server,
    require_service,
    unique_namespace,
    with_namespace,
)


@pytest.fixture
def nats_url() -> str:
    return require_service("nats")


@pytest.fixture
async def backend(nats_url: str) -> AsyncIterator[NatsBackend]:
    opened = NatsBackend(parse_url(with_namespace(nats_url, unique_namespace())))
    await opened.connect()
    yield opened
    await opened.destroy()
    await opened.close()


async def other_process(backend: NatsBackend) -> NatsBackend:
    """A second connection to the same namespace, standing in for another process."""
    other = NatsBackend(backend.url)
    await other.connect()
    return other


async def test_publish_fetch_ack_round_trip_in_order(backend: NatsBackend) -> None:
    consumer = await backend.consumer(ConsumerSpec("orders", "orders.*"))
    ids = [f"e{n}" for n in range(40)]
    await backend.publish(messages_on("orders.created", *ids))
    await backend.publish(messages_on("orders.created", "e0"))  # a retried publish: stored once
    got = await fetch_all(consumer, 40)
    assert bodies(got) == ids
    assert {(d.topic, d.attempt) for d in got} == {("orders.created", 1)}
    await consumer.ack(got)
    started = time.monotonic()
    assert await consumer.fetch(10, 0.3) == []
    assert 0.2 < time.monotonic() - started < 2.0
    assert await backend.consumers() == [ConsumerInfo("orders", "orders.*", 0)]
    await consumer.close()


async def test_a_message_the_broker_refuses_fails_the_publish_at_once(
    backend: NatsBackend,
) -> None:
    too_big = Message("big", "t.x", None, b"x" * (2 * 1024 * 1024))  # over max_payload
    with pytest.raises(EventwireError, match="refused event 'big'"):
        await asyncio.wait_for(backend.publish([too_big]), 5)


async def test_start_latest_earliest_and_at_a_time(backend: NatsBackend) -> None:
    await backend.publish(messages_on("t.x", "old"))
    cut = datetime.now(UTC)
    latest = await backend.consumer(ConsumerSpec("latest", "t.x"))
    earliest = await backend.consumer(ConsumerSpec("earliest", "t.x", start="earliest"))
    at_cut = await backend.consumer(ConsumerSpec("at-cut", "t.x", start=cut))
    await backend.publish(messages_on("t.x", "new"))
    assert bodies(await fetch_all(latest, 1)) == ["new"]
    assert bodies(await fetch_all(earliest, 2)) == ["old", "new"]
    assert bodies(await fetch_all(at_cut, 1)) == ["new"]
    with pytest.raises(ValueError, match="timezone-aware"):
        await backend.consumer(ConsumerSpec("naive", "t.x", start=datetime.now()))


async def test_competing_consumers_split_without_duplicates(backend: NatsBackend) -> None:
    other = await other_process(backend)
    try:
        first = await backend.consumer(ConsumerSpec("workers", "jobs.>"))
        second = await other.consumer(ConsumerSpec("workers", "jobs.>"))
        ids = [f"j{n}" for n in range(60)]
        await backend.publish(messages_on("jobs.run", *ids))
        seen: dict[str, list[str]] = {"first": [], "second": []}
        deadline = time.monotonic() + 10
        while sum(map(len, seen.values())) < len(ids) and time.monotonic() < deadline:
            for label, consumer in (("first", first), ("second", second)):
                batch = await consumer.fetch(7, 0.2)
                seen[label].extend(bodies(batch))
                await consumer.ack(batch)
        everything = seen["first"] + seen["second"]
        assert sorted(everything) == sorted(ids)  # each exactly once
        assert seen["first"]
        assert seen["second"]
    finally:
        await other.close()


async def test_unacked_delivery_of_a_dead_process_is_redelivered_after_ack_wait(
    backend: NatsBackend,
) -> None:
    doomed = await other_process(backend)
    spec = ConsumerSpec("work", "w", ack_wait=1.0)
    dying = await doomed.consumer(spec)
    survivor = await backend.consumer(spec)
    await backend.publish(messages_on("w", "job"))
    [held] = await fetch_all(dying, 1)
    await doomed.close()  # the process dies holding the delivery: no ack, no nak
    started = time.monotonic()
    [again] = await fetch_all(survivor, 1, timeout=5)
    assert again.body == b"job"
    # Usually 2. nats-server 2.9 sometimes reports the first delivery count again when the
    # dead connection's pull request was still pending: the bus never relies on it.
    assert again.attempt in (1, 2)
    assert 0.5 < time.monotonic() - started < 3.0
    assert held.attempt == 1


async def test_extend_keeps_a_delivery_from_being_redelivered(backend: NatsBackend) -> None:
    spec = ConsumerSpec("slow", "s", ack_wait=1.0)
    holder = await backend.consumer(spec)
    rival = await backend.consumer(spec)
    await backend.publish(messages_on("s", "long-job"))
    [held] = await fetch_all(holder, 1)
    deadline = time.monotonic() + 2.2  # twice ack_wait
    while time.monotonic() < deadline:
        await holder.extend([held])
        assert await rival.fetch(1, 0.3) == []
    await holder.ack([held])
    assert await rival.fetch(1, 1.2) == []


async def test_nak_now_and_with_a_delay_and_attempt_counts(backend: NatsBackend) -> None:
    consumer = await backend.consumer(ConsumerSpec("retry", "r"))
    await backend.publish(messages_on("r", "flaky"))
    [first] = await fetch_all(consumer, 1)
    await consumer.nak(first, 0)
    [second] = await consumer.fetch(1, 1.0)
    assert second.attempt == 2
    await consumer.nak(second, 1.0)
    started = time.monotonic()
    assert await consumer.fetch(1, 0.4) == []
    [third] = await fetch_all(consumer, 1, timeout=5)
    assert third.attempt == 3
    assert 0.8 < time.monotonic() - started < 3.0
    await consumer.ack([third])


async def test_handled_ids_are_recorded_per_consumer_and_forgotten_on_delete(
    backend: NatsBackend,
) -> None:
    consumer = await backend.consumer(ConsumerSpec("idem", "i"))
    other = await backend.consumer(ConsumerSpec("other", "i"))
    assert await consumer.handled(["a"]) == set()  # before any bucket exists
    await backend.publish(messages_on("i", "a", "b"))
    got = await fetch_all(consumer, 2)
    odd = "id with spaces/ü.and.dots"
    await consumer.ack(got, handled_ids=["a", odd])
    assert await consumer.handled(["a", "b", odd, "never"]) == {"a", odd}
    assert await other.handled(["a", odd]) == set()
    await consumer.close()
    await backend.delete_consumer("idem")
    again = await backend.consumer(ConsumerSpec("idem", "i"))
    assert await again.handled(["a", odd]) == set()


async def test_outstanding_counts_waiting_and_in_flight_until_acked(
    backend: NatsBackend,
) -> None:
    consumer = await backend.consumer(ConsumerSpec("counted", "c.>"))
    await backend.publish(messages_on("c.1", "x", "y", "z"))
    [info] = await backend.consumers()
    assert (info.name, info.pattern, info.outstanding) == ("counted", "c.>", 3)
    got = await fetch_all(consumer, 3)
    assert [i.outstanding for i in await backend.consumers()] == [3]  # in flight
    # Acks are published and flushed, not requested: JetStream applies them just after.
    await consumer.ack(got[:2])
    await outstanding_becomes(backend, 1)
    await consumer.ack(got[2:])
    await outstanding_becomes(backend, 0)


async def outstanding_becomes(backend: NatsBackend, expected: int) -> None:
    async with asyncio.timeout(5):
        while [i.outstanding for i in await backend.consumers()] != [expected]:  # noqa: ASYNC110 - server state, no event to await
            await asyncio.sleep(0.01)


async def test_wildcards_new_topics_and_reserved_topics(backend: NatsBackend) -> None:
    one = await backend.consumer(ConsumerSpec("one", "a.*"))
    tail = await backend.consumer(ConsumerSpec("tail", "a.>"))
    everything = await backend.consumer(ConsumerSpec("all", ">"))
    star = await backend.consumer(ConsumerSpec("star", "*.z"))
    bus = await backend.consumer(ConsumerSpec("bus", "_bus.>"))
    # All of these topics are first used after the consumers were created.
    for topic in ("a.b", "a.b.c", "x.z", "_bus.z", "_dlq.a.b", "a"):
        await backend.publish(messages_on(topic, topic))
    assert sorted(bodies(await fetch_all(one, 1))) == ["a.b"]
    assert sorted(bodies(await fetch_all(tail, 2))) == ["a.b", "a.b.c"]
    assert sorted(bodies(await fetch_all(everything, 4))) == ["a", "a.b", "a.b.c", "x.z"]
    assert sorted(bodies(await fetch_all(star, 1))) == ["x.z"]
    assert bodies(await fetch_all(bus, 1)) == ["_bus.z"]
    for consumer in (one, tail, everything, star, bus):
        assert await consumer.fetch(5, 0.2) == []  # nothing more, and `_` topics never leak
    # The reserved messages that reached `>` and `*.z` were acknowledged, not left pending.
    assert {i.name: i.outstanding for i in await backend.consumers()} == {
        "one": 1,
        "tail": 2,
        "all": 4,
        "star": 1,
        "bus": 1,
    }


def _hpub(subject: bytes, headers: bytes, payload: bytes) -> bytes:
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (
        subject,
        len(headers),
        len(headers) + len(payload),
        headers,
        payload,
    )


async def test_foreign_and_malformed_messages_are_delivered_as_they_are(
    backend: NatsBackend, nats_url: str
) -> None:
    consumer = await backend.consumer(ConsumerSpec("robust", ">"))
    ns = backend.namespace.encode()
    raw = nats.NATS()
    await raw.connect(nats_url)
    try:
        await raw.jetstream().publish(f"{backend.namespace}.foreign.raw", b"\xff\x00 not json")
        await raw.jetstream().publish(f"{backend.namespace}.foreign.empty", b"")
    finally:
        await raw.close()
    # What nats-py itself cannot even parse: a subject that is not UTF-8, junk header lines, a
    # header block mimicking a JetStream status.
    where = parse_url(nats_url)
    with socket.create_connection((where.host, where.port), timeout=5) as sock:
        sock.recv(4096)
        sock.sendall(
            b'CONNECT {"verbose":false,"headers":true}\r\n'
            + b"PUB %s.bad\xff\xfe 3\r\nabc\r\n" % ns
            + _hpub(b"%s.junk.headers" % ns, b"NATS/1.0 \xff\xfe\r\nno colon\r\n\r\n", b"j")
            + _hpub(b"%s.fake.status" % ns, b"NATS/1.0 404 No Messages\r\n\r\n", b"s")
            + b"PING\r\n"
        )
        assert b"PONG" in sock.recv(4096)
    await backend.publish(messages_on("after.all", "fine"))
    got = await fetch_all(consumer, 6)
    assert [d.body for d in got] == [b"\xff\x00 not json", b"", b"abc", b"j", b"s", b"fine"]
    topics = [d.topic for d in got]
    assert topics[:2] == ["foreign.raw", "foreign.empty"]
    assert topics[2].startswith("bad")  # best effort: undecodable bytes replaced
    assert topics[3:] == ["junk.headers", "fake.status", "after.all"]
    await consumer.ack(got)
    assert await consumer.fetch(5, 0.2) == []


async def test_resume_after_reopen_and_pattern_change_refused(backend: NatsBackend) -> None:
    consumer = await backend.consumer(ConsumerSpec("durable", "d.*"))
    await consumer.close()
    await backend.publish(messages_on("d.x", "while-closed-1", "while-closed-2"))
    reopened = await backend.consumer(ConsumerSpec("durable", "d.*", start="latest"))
    assert bodies(await fetch_all(reopened, 2)) == ["while-closed-1", "while-closed-2"]
    with pytest.raises(ValueError, match=r"'d\.\*'.*'e\.\*'"):
        await backend.consumer(ConsumerSpec("durable", "e.*"))


async def test_close_gives_back_held_deliveries_at_once(backend: NatsBackend) -> None:
    spec = ConsumerSpec("handback", "h", ack_wait=30)
    leaving = await backend.consumer(spec)
    staying = await backend.consumer(spec)
    await backend.publish(messages_on("h", "one", "two"))
    assert len(await fetch_all(leaving, 2)) == 2
    await leaving.close()
    got = await fetch_all(staying, 2, timeout=3)
    assert sorted(bodies(got)) == ["one", "two"]
    assert {d.attempt for d in got} == {2}


async def test_close_ends_a_fetch_in_progress_without_taking_messages(
    backend: NatsBackend,
) -> None:
    spec = ConsumerSpec("closing", "q", ack_wait=30)
    closing = await backend.consumer(spec)
    fetching = asyncio.create_task(closing.fetch(10, 5.0))
    await asyncio.sleep(0.1)  # the fetch is now waiting at the server
    started = time.monotonic()
    await closing.close()
    assert await asyncio.wait_for(fetching, 2) == []
    assert time.monotonic() - started < 1.0
    await backend.publish(messages_on("q", "after-close"))
    other = await backend.consumer(spec)
    [got] = await fetch_all(other, 1, timeout=3)
    assert (got.body, got.attempt) == (b"after-close", 1)  # not swallowed by the closed one


async def test_a_consumer_deleted_meanwhile(backend: NatsBackend) -> None:
    durable = await backend.consumer(ConsumerSpec("deleted", "del"))
    await backend.delete_consumer("deleted")
    with pytest.raises(LookupError, match="'deleted' no longer exists"):
        await durable.fetch(1, 0.2)
    # An inbox removed by the server after a pause in fetching is simply made again.
    inbox = await backend.consumer(ConsumerSpec("_inbox.x", "_bus.reply.x", ephemeral=True))
    await backend.delete_consumer("_inbox.x")
    assert await inbox.fetch(1, 0.2) == []
    await backend.publish(messages_on("_bus.reply.x", "reply"))
    assert bodies(await fetch_all(inbox, 1, timeout=3)) == ["reply"]
    await inbox.close()


async def test_ephemeral_consumer_is_removed_on_close(backend: NatsBackend) -> None:
    inbox = await backend.consumer(ConsumerSpec("_inbox.abc", "_bus.reply.abc", ephemeral=True))
    durable = await backend.consumer(ConsumerSpec("kept", "k"))
    assert {i.name for i in await backend.consumers()} == {"_inbox.abc", "kept"}
    await inbox.close()
    await durable.close()
    assert [i.name for i in await backend.consumers()] == ["kept"]


async def test_delete_consumer_and_destroy(backend: NatsBackend, nats_url: str) -> None:
    consumer = await backend.consumer(ConsumerSpec("gone soon", "g"))
    await consumer.close()
    await backend.delete_consumer("gone soon")
    await backend.delete_consumer("gone soon")  # no error when absent
    assert await backend.consumers() == []
    await backend.destroy()
    raw = nats.NATS()
    await raw.connect(nats_url)
    try:
        with pytest.raises(nats.js.errors.NotFoundError):
            await raw.jetstream().stream_info(backend.stream)
    finally:
        await raw.close()
    await backend.destroy()  # idempotent


async def test_connecting_to_a_closed_port_names_the_redacted_url() -> None:
    url = f"nats://app:s3cret@127.0.0.1:{free_port()}?namespace=nowhere"
    backend = NatsBackend(parse_url(url))
    message = await connect_error(backend)
    assert "nats://app:***@127.0.0.1" in message
    assert "s3cret" not in message
    await backend.close()


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateServer]:
    with private_server("nats", tmp_path / "jetstream") as server:
        yield server


async def test_broker_restart_loses_no_confirmed_publish(private_nats: PrivateServer) -> None:
    backend = NatsBackend(parse_url(with_namespace(private_nats.url, "restart")))
    await backend.connect()
    try:
        consumer = await backend.consumer(ConsumerSpec("survivor", "jobs.>", ack_wait=5))
        confirmed: list[str] = []
        received: set[str] = set()
        publishing_done = asyncio.Event()

        async def produce() -> None:
            for n in range(0, 300, 5):
                ids = [f"m{n + k}" for k in range(5)]
                await asyncio.wait_for(backend.publish(messages_on("jobs.run", *ids)), 20)
                confirmed.extend(ids)
                await asyncio.sleep(0.005)
            publishing_done.set()

        async def consume() -> None:
            while not (publishing_done.is_set() and received >= set(confirmed)):
                try:
                    got = await consumer.fetch(50, 0.5)
                    received.update(bodies(got))
                    await consumer.ack(got)
                except BackendConnectionError:
                    pass  # an ack lost in the outage: those come again

        producer = asyncio.create_task(produce())
        reader = asyncio.create_task(consume())
        try:
            deadline = time.monotonic() + 10
            while len(confirmed) < 40 or not received:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            private_nats.kill()
            while backend.nc.is_connected:  # PubAcks already on their way may still land
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            before = len(confirmed)
            await asyncio.sleep(0.5)  # an outage, during which publishing keeps retrying
            assert len(confirmed) == before  # nothing is confirmed while the broker is down
            assert not producer.done()
            private_nats.start()
            await asyncio.wait_for(asyncio.gather(producer, reader), 30)
        finally:
            producer.cancel()
            reader.cancel()
            await asyncio.gather(producer, reader, return_exceptions=True)
        assert received >= set(confirmed)
        assert len(confirmed) == 300
    finally:
        with contextlib.suppress(Exception):
            await backend.destroy()
        await backend.close()


async def test_credentials_are_used_and_a_wrong_password_is_not_shown(tmp_path: Path) -> None:
    with private_server("nats", tmp_path / "js", "--user", "app", "--pass", "right") as server:
        wrong = NatsBackend(parse_url(f"nats://app:wrong@127.0.0.1:{server.port}"))
        with pytest.raises(BackendConnectionError) as raised:
            await wrong.connect()
        assert "wrong" not in str(raised.value)
        assert "nats://app:***@" in str(raised.value)
        right = NatsBackend(parse_url(f"nats://app:right@127.0.0.1:{server.port}"))
        await right.connect()
        await right.publish(messages_on("x", "1"))
        await right.destroy()
        await right.close()
