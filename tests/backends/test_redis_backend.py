"""The redis:// backend against a real Redis: streams, consumer groups, redelivery, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from eventwire.backends import open_backend
from eventwire.backends import redis as redis_backend
from eventwire.backends.base import (
    Backend,
    BackendConnectionError,
    ConsumerSpec,
    Delivery,
    Message,
)
from eventwire.backends.broker import BrokerBackend
from eventwire.backends.redis import RedisBackend, RedisConsumer
from tests.backends.helpers import bodies, connect_error, fetch_all, messages
from tests.services import (
    PrivateServer,
    free_port,
    private_server,
    require_service,
    unique_namespace,
    with_namespace,
)

URL = require_service("redis")


async def open_redis(url: str) -> RedisBackend:
    backend = open_backend(url)
    assert isinstance(backend, RedisBackend)
    await backend.connect()
    return backend


@contextlib.asynccontextmanager
async def own_namespace(options: str = "") -> AsyncIterator[RedisBackend]:
    """A backend on a namespace of its own, with more URL `options`; destroyed afterwards."""
    opened = await open_redis(with_namespace(URL, unique_namespace()) + options)
    try:
        yield opened
    finally:
        await opened.destroy()
        await opened.close()


@pytest.fixture
async def backend() -> AsyncIterator[RedisBackend]:
    async with own_namespace() as opened:
        yield opened


@pytest.fixture
async def raw() -> AsyncIterator[Redis]:
    client = Redis(host="127.0.0.1", port=6379)
    yield client
    await client.aclose()


async def test_publish_fetch_ack_round_trip_in_order(backend: RedisBackend) -> None:
    consumer = await backend.consumer(ConsumerSpec("orders", "orders.*"))
    await backend.publish(messages(*[(f"e{i}", "orders.new") for i in range(5)]))
    got = await consumer.fetch(10, 2.0)
    assert bodies(got) == [f"e{i}" for i in range(5)]
    assert {(d.topic, d.attempt) for d in got} == {("orders.new", 1)}
    await consumer.ack(got)
    assert await consumer.fetch(10, 0.2) == []
    assert [info.outstanding for info in await backend.consumers()] == [0]
    await consumer.close()


async def test_fetch_waits_for_a_publish_and_times_out_empty(backend: RedisBackend) -> None:
    consumer = await backend.consumer(ConsumerSpec("c", "t"))
    started = time.monotonic()
    assert await consumer.fetch(5, 0.3) == []
    assert 0.25 <= time.monotonic() - started < 2.0
    waiting = asyncio.create_task(consumer.fetch(5, 5.0))
    await asyncio.sleep(0.1)  # let the fetch block first: the publish must wake it
    started = time.monotonic()
    await backend.publish(messages(("late", "t")))
    assert bodies(await asyncio.wait_for(waiting, 5)) == ["late"]
    assert time.monotonic() - started < 0.5


async def test_start_latest_earliest_and_datetime(backend: RedisBackend, raw: Redis) -> None:
    await backend.publish(messages(("old", "t")))
    [(old_id, _)] = await raw.xrange(backend.stream)
    old_ms = int(old_id.split(b"-")[0])
    # Wait until the server clock is past the old entry's millisecond.
    deadline = time.monotonic() + 5
    while int((await raw.time())[0]) * 1000 + (await raw.time())[1] // 1000 <= old_ms:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.002)
    since = datetime.fromtimestamp((old_ms + 1) / 1000, UTC)
    latest = await backend.consumer(ConsumerSpec("latest", "t"))
    earliest = await backend.consumer(ConsumerSpec("earliest", "t", start="earliest"))
    timed = await backend.consumer(ConsumerSpec("timed", "t", start=since))
    await backend.publish(messages(("new", "t")))
    assert bodies(await fetch_all(latest, 1)) == ["new"]
    assert bodies(await fetch_all(earliest, 2)) == ["old", "new"]
    assert bodies(await fetch_all(timed, 1)) == ["new"]
    # A datetime just before the old entry replays it too.
    before = datetime.fromtimestamp(old_ms / 1000, UTC)
    replay = await backend.consumer(ConsumerSpec("before", "t", start=before))
    assert bodies(await fetch_all(replay, 2)) == ["old", "new"]


async def test_reopening_with_another_pattern_raises(backend: RedisBackend) -> None:
    await backend.consumer(ConsumerSpec("c", "a.*"))
    with pytest.raises(ValueError, match=r"'a\.\*'.*'b\.>'"):
        await backend.consumer(ConsumerSpec("c", "b.>"))


async def test_competing_consumers_split_without_duplicates(backend: RedisBackend) -> None:
    first = await backend.consumer(ConsumerSpec("workers", "jobs.>"))
    second = await backend.consumer(ConsumerSpec("workers", "jobs.>"))
    await backend.publish(messages(*[(f"j{i}", "jobs.run") for i in range(40)]))
    seen: dict[str, list[str]] = {"first": [], "second": []}
    deadline = time.monotonic() + 10
    while len(seen["first"]) + len(seen["second"]) < 40:
        assert time.monotonic() < deadline
        for label, consumer in (("first", first), ("second", second)):
            got = await consumer.fetch(5, 0.2)
            seen[label] += bodies(got)
            await consumer.ack(got)
    everything = seen["first"] + seen["second"]
    assert sorted(everything) == sorted(f"j{i}" for i in range(40))
    assert len(set(everything)) == 40
    assert seen["first"]
    assert seen["second"]


async def test_competing_consumers_fetching_concurrently(backend: RedisBackend) -> None:
    consumers = [await backend.consumer(ConsumerSpec("pool", "p")) for _ in range(3)]
    await backend.publish(messages(*[(f"p{i}", "p") for i in range(60)]))
    seen: list[str] = []

    async def work(consumer: Any) -> None:
        while len(seen) < 60:
            got = await consumer.fetch(4, 0.3)
            seen.extend(bodies(got))
            await consumer.ack(got)

    await asyncio.wait_for(asyncio.gather(*(work(c) for c in consumers)), 10)
    assert sorted(seen) == sorted(f"p{i}" for i in range(60))


async def test_redelivery_after_ack_wait_when_a_consumer_dies(backend: RedisBackend) -> None:
    spec = ConsumerSpec("jobs", "jobs", ack_wait=1.0)
    dead = await backend.consumer(spec)
    await backend.publish(messages(("j1", "jobs")))
    [first] = await fetch_all(dead, 1)
    assert first.attempt == 1
    del dead  # the process "dies": no ack, no close
    survivor = await backend.consumer(spec)
    started = time.monotonic()
    assert await survivor.fetch(5, 0.5) == []  # still leased
    [again] = await fetch_all(survivor, 1, timeout=5)
    waited = time.monotonic() - started
    assert (again.body, again.attempt) == (b"j1", 2)
    assert 0.8 <= waited < 3.0
    await survivor.ack([again])


async def test_extend_keeps_a_delivery_from_being_redelivered(backend: RedisBackend) -> None:
    spec = ConsumerSpec("slow", "s", ack_wait=0.6)
    holder = await backend.consumer(spec)
    other = await backend.consumer(spec)
    await backend.publish(messages(("s1", "s")))
    [held] = await fetch_all(holder, 1)
    until = time.monotonic() + 2.0
    while time.monotonic() < until:
        await holder.extend([held])
        assert await other.fetch(5, 0.2) == []
    await holder.ack([held])
    assert await other.fetch(5, 1.0) == []


async def test_nak_with_delay_and_nak_zero(backend: RedisBackend) -> None:
    spec = ConsumerSpec("n", "n")
    first = await backend.consumer(spec)
    second = await backend.consumer(spec)
    await backend.publish(messages(("n1", "n")))
    [delivery] = await fetch_all(first, 1)
    naked = time.monotonic()
    await first.nak(delivery, 0.6)
    assert await second.fetch(5, 0.2) == []
    [again] = await fetch_all(second, 1)
    assert time.monotonic() - naked >= 0.55
    assert (again.body, again.attempt) == (b"n1", 2)
    # nak(0) wakes a competing consumer that is blocked in fetch right away.
    waiting = asyncio.create_task(first.fetch(5, 5.0))
    await asyncio.sleep(0.1)
    handed = time.monotonic()
    await second.nak(again, 0)
    [third] = await asyncio.wait_for(waiting, 5)
    assert time.monotonic() - handed < 0.5
    assert third.attempt == 3
    await first.ack([third])
    assert [info.outstanding for info in await backend.consumers()] == [0]


async def test_nak_by_a_consumer_that_lost_the_delivery_is_ignored(
    backend: RedisBackend,
) -> None:
    spec = ConsumerSpec("lost", "l", ack_wait=0.3)
    slow = await backend.consumer(spec)
    fast = await backend.consumer(spec)
    await backend.publish(messages(("l1", "l")))
    [stale] = await fetch_all(slow, 1)
    [taken] = await fetch_all(fast, 1, timeout=5)  # after ack_wait it moved to `fast`
    assert taken.attempt == 2
    await slow.nak(stale, 0)
    await slow.extend([stale])
    # Acknowledged at once, so that no lease can run out meanwhile on a slow machine: had the
    # stale nak put the message back, it would still come now.
    await fast.ack([taken])
    assert await slow.fetch(5, 0.3) == []
    assert await fast.fetch(5, 0.1) == []


async def test_attempts_count_every_redelivery(backend: RedisBackend) -> None:
    consumer = await backend.consumer(ConsumerSpec("a", "a", ack_wait=0.3))
    await backend.publish(messages(("a1", "a")))
    attempts = []
    for _ in range(2):
        [d] = await fetch_all(consumer, 1)
        attempts.append(d.attempt)
        await consumer.nak(d, 0)
    [d] = await fetch_all(consumer, 1)
    attempts.append(d.attempt)  # then let ack_wait expire: taken over again
    [d] = await fetch_all(consumer, 1, timeout=5)
    attempts.append(d.attempt)
    assert attempts == [1, 2, 3, 4]


async def test_close_hands_back_unacked_deliveries(backend: RedisBackend) -> None:
    spec = ConsumerSpec("handback", "h")
    leaving = await backend.consumer(spec)
    staying = await backend.consumer(spec)
    await backend.publish(messages(("h1", "h"), ("h2", "h")))
    got = await fetch_all(leaving, 2)
    await leaving.close()
    started = time.monotonic()
    again = await fetch_all(staying, 2)
    assert time.monotonic() - started < 1.0
    assert bodies(again) == ["h1", "h2"]
    assert [d.attempt for d in again] == [2, 2]
    assert bodies(got) == bodies(again)


async def test_handled_ids_are_recorded_with_the_ack(backend: RedisBackend) -> None:
    consumer = await backend.consumer(ConsumerSpec("idem", "i"))
    await backend.publish(messages(("i1", "i"), ("i2", "i")))
    got = await fetch_all(consumer, 2)
    assert await consumer.handled(["i1", "i2"]) == set()
    await consumer.ack(got, handled_ids=["i1"])
    assert await consumer.handled(["i1", "i2", "zzz"]) == {"i1"}
    other = await backend.consumer(ConsumerSpec("other", "i"))
    assert await other.handled(["i1"]) == set()
    await backend.delete_consumer("idem")
    again = await backend.consumer(ConsumerSpec("idem", "i"))
    assert await again.handled(["i1"]) == set()


async def test_dedup_window_deduplicates_by_message_id(raw: Redis) -> None:
    async with own_namespace("&dedup_window=60") as backend:
        consumer = await backend.consumer(ConsumerSpec("d", "d"))
        await backend.publish(messages(("same", "d"), ("same", "d")))
        await backend.publish(messages(("same", "d"), ("other", "d")))
        got = await fetch_all(consumer, 2)
        assert bodies(got) == ["same", "other"]
        assert await consumer.fetch(5, 0.2) == []
        assert 0 < await raw.ttl(f"{{{backend.namespace}}}:dedup:same") <= 60


async def test_without_dedup_window_each_publish_is_stored(
    backend: RedisBackend, raw: Redis
) -> None:
    # The default: no marker per event; publishing the same id again stores it again (at
    # least once; idempotent subscriptions skip what they handled).
    await backend.publish(messages(("same", "d")))
    await backend.publish(messages(("same", "d")))
    assert await raw.xlen(backend.stream) == 2
    assert await raw.keys(f"{{{backend.namespace}}}:dedup:*") == []


async def stream_ids(raw: Redis, backend: RedisBackend) -> list[str]:
    """The event ids in the namespace's stream, in order."""
    entries: Any = await raw.xrange(backend.stream)
    return [fields[b"id"].decode() for _, fields in entries]


@pytest.mark.parametrize("stored_before_loss", [0, 3, 5])
async def test_a_publish_retried_after_a_lost_reply_stores_each_message_once(
    backend: RedisBackend, raw: Redis, monkeypatch: pytest.MonkeyPatch, stored_before_loss: int
) -> None:
    ids = [f"m{i}" for i in range(5)]
    send = backend._send
    tries: list[list[str]] = []

    async def reply_lost_once(batch: Sequence[Message]) -> None:
        tries.append([m.id for m in batch])
        if len(tries) == 1:
            # The server stored part of the batch (or all, or none); the reply never came.
            await send(batch[:stored_before_loss])
            raise redis_errors.ConnectionError("connection reset while reading the reply")
        await send(batch)

    monkeypatch.setattr(backend, "_send", reply_lost_once)
    await raw.xadd(backend.stream, {"id": "m3", "topic": "t", "body": b"m3"}, id="1-1")
    await backend.publish(messages(*[(i, "t") for i in ids]))
    assert await stream_ids(raw, backend) == ["m3", *ids]  # an old m3 is not mistaken for ours
    assert tries[0] == ids
    assert tries[1:] == ([] if stored_before_loss == 5 else [ids[stored_before_loss:]])


async def test_stored_since_scans_in_chunks(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_backend, "_SCAN_CHUNK", 700)
    await backend.publish(messages(*[(f"e{i}", "t") for i in range(2000)]))
    wanted = ["e5", "e1500", "e1999", "nope"]
    assert await backend._stored_since(wanted, 60.0) == {"e5", "e1500", "e1999"}
    await asyncio.sleep(0.01)
    assert await backend._stored_since(wanted, 0.0) == set()  # nothing added since now


async def test_large_batches_keys_and_any_bytes_round_trip(
    backend: RedisBackend, raw: Redis
) -> None:
    consumer = await backend.consumer(ConsumerSpec("big", "big.>", start="earliest"))
    bodies_sent = [bytes([i % 256]) * (i % 3000) + b"\r\n\x00" for i in range(2500)]
    bodies_sent[7] = b""
    bodies_sent[8] = b"y" * 300_000  # bigger than a packed argument
    batch = [
        Message(f"b{i}", f"big.{i % 3}", f"k{i}" if i % 2 else None, body)
        for i, body in enumerate(bodies_sent)
    ]
    await backend.publish(batch)  # several script calls in one round trip
    got: list[Delivery] = []
    while len(got) < len(batch):
        more = await consumer.fetch(512, 2.0)
        assert more, f"only {len(got)} came"
        got += more
        await consumer.ack(more)
    assert [d.body for d in got] == bodies_sent
    assert [d.topic for d in got] == [m.topic for m in batch]
    assert {d.attempt for d in got} == {1}
    entries: Any = await raw.xrange(backend.stream, count=4)
    assert [fields.get(b"key") for _, fields in entries] == [None, b"k1", None, b"k3"]
    assert list(entries[0][1]) == [b"id", b"topic", b"body"]


async def test_one_fetch_returns_redeliveries_and_new_entries_oldest_first(
    backend: RedisBackend,
) -> None:
    consumer = await backend.consumer(ConsumerSpec("mixed", "x"))
    await backend.publish(messages(("x1", "x"), ("x2", "x"), ("x3", "x")))
    first = await fetch_all(consumer, 3)
    for delivery in reversed(first[:2]):  # due in the reverse order
        await consumer.nak(delivery, 0)
    await consumer.ack(first[2:])
    await backend.publish(messages(("x4", "x")))
    again = await fetch_all(consumer, 3)
    assert [(d.body, d.attempt) for d in again] == [(b"x1", 2), (b"x2", 2), (b"x4", 1)]


async def test_consumers_outstanding_goes_to_zero(backend: RedisBackend) -> None:
    orders = await backend.consumer(ConsumerSpec("orders", "orders.>"))
    await backend.consumer(ConsumerSpec("users.*", "users.*"))
    await backend.publish(
        messages(("o1", "orders.a"), ("o2", "orders.b.c"), ("u1", "users.x"), ("x", "other"))
    )
    counts = {info.name: (info.pattern, info.outstanding) for info in await backend.consumers()}
    assert counts == {"orders": ("orders.>", 2), "users.*": ("users.*", 1)}
    got = await fetch_all(orders, 2)
    await orders.nak(got[0], 30)  # waiting in the delayed set still counts
    assert {i.name: i.outstanding for i in await backend.consumers()}["orders"] == 2
    await orders.ack(got[1:])
    assert {i.name: i.outstanding for i in await backend.consumers()}["orders"] == 1
    await backend.delete_consumer("users.*")
    await backend.delete_consumer("orders")
    assert await backend.consumers() == []


async def test_wildcards_new_topics_and_reserved_topics(backend: RedisBackend) -> None:
    tail = await backend.consumer(ConsumerSpec("tail", ">"))
    single = await backend.consumer(ConsumerSpec("single", "*.created"))
    reserved = await backend.consumer(ConsumerSpec("dlq", "_dlq.>"))
    await backend.publish(
        messages(
            ("1", "user.created"),
            ("2", "brand-new_topic.created"),
            ("3", "user.created.extra"),
            ("4", "_dlq.user.created"),
            ("5", "created"),
        )
    )
    assert bodies(await fetch_all(tail, 4)) == ["1", "2", "3", "5"]
    assert bodies(await fetch_all(single, 2)) == ["1", "2"]
    assert bodies(await fetch_all(reserved, 1)) == ["4"]
    for consumer in (tail, single, reserved):
        assert await consumer.fetch(10, 0.1) == []
    outstanding = {info.name: info.outstanding for info in await backend.consumers()}
    assert outstanding == {"tail": 4, "single": 2, "dlq": 1}


async def test_foreign_malformed_entries_are_delivered(backend: RedisBackend, raw: Redis) -> None:
    consumer = await backend.consumer(ConsumerSpec("f", "orders.>"))
    await raw.xadd(backend.stream, {"junk": b"\xff\x00"})  # no topic, no body
    await raw.xadd(backend.stream, {"topic": b"\xfe\xff bad", "body": b"\x00garbage"})
    await raw.xadd(backend.stream, {"topic": "orders.x", "body": b"not an envelope"})
    await raw.xadd(backend.stream, {"topic": "other.x", "body": b"for nobody here"})
    await backend.publish(messages(("ok", "orders.new")))
    got = await fetch_all(consumer, 4)
    assert [(d.topic, d.body) for d in got] == [
        ("", b""),
        ("\ufffd\ufffd bad", b"\x00garbage"),
        ("orders.x", b"not an envelope"),
        ("orders.new", b"ok"),
    ]
    await consumer.ack(got)
    assert await consumer.fetch(5, 0.1) == []


async def test_resume_after_reopen(backend: RedisBackend) -> None:
    spec = ConsumerSpec("resume", "r")
    consumer = await backend.consumer(spec)
    await backend.publish(messages(("r1", "r")))
    await consumer.ack(await fetch_all(consumer, 1))
    await consumer.close()
    await backend.publish(messages(("r2", "r"), ("r3", "r")))
    # `start` is ignored for an existing consumer.
    reopened = await backend.consumer(ConsumerSpec("resume", "r", start="earliest"))
    assert bodies(await fetch_all(reopened, 2)) == ["r2", "r3"]


async def test_resume_through_another_backend_connection(backend: RedisBackend) -> None:
    consumer = await backend.consumer(ConsumerSpec("proc", "p"))
    await backend.publish(messages(("p1", "p")))
    await consumer.close()
    other = await open_redis(with_namespace(URL, backend.namespace))
    try:
        consumer = await other.consumer(ConsumerSpec("proc", "p"))
        assert bodies(await fetch_all(consumer, 1)) == ["p1"]
    finally:
        await other.close()


async def test_ephemeral_consumer_is_removed_on_close(backend: RedisBackend, raw: Redis) -> None:
    inbox = await backend.consumer(ConsumerSpec("_inbox.x1", "_inbox.x1", ephemeral=True))
    await backend.publish(messages(("m", "_inbox.x1")))
    await fetch_all(inbox, 1)
    await inbox.close()
    assert await backend.consumers() == []
    assert await raw.xinfo_groups(backend.stream) == []


async def test_delete_consumer_and_destroy(backend: RedisBackend, raw: Redis) -> None:
    consumer = await backend.consumer(ConsumerSpec("gone", "g"))
    await backend.publish(messages(("g1", "g")))
    await consumer.ack(await fetch_all(consumer, 1), handled_ids=["g1"])
    await backend.delete_consumer("gone")
    await backend.delete_consumer("never-existed")
    with pytest.raises(LookupError, match="gone"):
        await consumer.fetch(1, 0.1)
    await backend.consumer(ConsumerSpec("gone", "another.pattern"))  # a new one may differ
    assert await raw.keys(backend.stream.replace("events", "*")) != []
    await backend.destroy()
    assert await raw.keys(backend.stream.replace("events", "*")) == []


async def test_namespaces_do_not_see_each_other(backend: RedisBackend) -> None:
    async with own_namespace() as other:
        mine = await backend.consumer(ConsumerSpec("c", "t"))
        theirs = await other.consumer(ConsumerSpec("c", "t"))
        await other.publish(messages(("theirs", "t")))
        await backend.publish(messages(("mine", "t")))
        assert bodies(await fetch_all(mine, 1)) == ["mine"]
        assert bodies(await fetch_all(theirs, 1)) == ["theirs"]
        assert await mine.fetch(5, 0.1) == []


async def test_maxlen_trims_the_stream_approximately(raw: Redis) -> None:
    async with own_namespace("&maxlen=10") as backend:
        await backend.publish(messages(*[(f"m{i}", "t") for i in range(500)]))
        assert 10 <= await raw.xlen(backend.stream) < 500


async def test_prune_removes_idle_consumers_with_nothing_pending(
    backend: RedisBackend, raw: Redis
) -> None:
    spec = ConsumerSpec("pruned", "t")
    idle = await backend.consumer(spec)
    busy = await backend.consumer(spec)
    assert isinstance(idle, RedisConsumer)
    assert isinstance(busy, RedisConsumer)
    await backend.publish(messages(("t1", "t"), ("t2", "t")))
    await idle.ack(await fetch_all(idle, 1))  # known to the group, nothing pending
    await fetch_all(busy, 1)
    me = await backend.consumer(spec)
    assert isinstance(me, RedisConsumer)
    removed = await backend.prune_script(backend.client, [backend.stream], [me.group, me.name, -1])
    names = {c["name"].decode() for c in await raw.xinfo_consumers(backend.stream, me.group)}
    assert removed == 1
    assert names == {busy.name}  # it still holds a delivery


async def test_connect_to_a_closed_port_names_the_redacted_url() -> None:
    port = free_port()
    backend = open_backend(f"redis://:s3cret-pw@127.0.0.1:{port}/0?namespace=x")
    assert isinstance(backend, BrokerBackend)
    message = await connect_error(backend)
    assert f"redis://:***@127.0.0.1:{port}/0?namespace=x" in message
    assert "s3cret-pw" not in message
    assert f"connecting to 127.0.0.1:{port}" in message  # the underlying error


async def test_wrong_password_raises_backend_connection_error() -> None:
    backend = open_backend(with_namespace("redis://user:wrong-pw@127.0.0.1:6379/0", "x"))
    assert isinstance(backend, BrokerBackend)
    with pytest.raises(BackendConnectionError) as raised:
        await backend.connect()
    assert "wrong-pw" not in str(raised.value)
    assert "***" in str(raised.value)


def test_url_options_are_checked() -> None:
    with pytest.raises(ValueError, match="maxlen"):
        open_backend("redis://127.0.0.1/0?maxlen=-3")
    with pytest.raises(ValueError, match="dedup_window"):
        open_backend("redis://127.0.0.1/0?dedup_window=soon")
    with pytest.raises(ValueError, match="database"):
        open_backend("redis://127.0.0.1/zero")


# -- a private Redis restarted while publishing ---------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateServer]:
    with private_server("redis", tmp_path) as server:
        yield server


async def test_restart_during_publishing_loses_nothing(
    private_redis: PrivateServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = with_namespace(private_redis.url, unique_namespace())
    publisher: Backend = await open_redis(url)
    reader = await open_redis(url)
    consumer = await reader.consumer(ConsumerSpec("all", "e.>", start="earliest"))
    published: list[str] = []
    received: list[str] = []
    restarted_at: list[int] = []
    under_way = asyncio.Event()
    total = 150

    async def publish() -> None:
        for i in range(total):
            await asyncio.wait_for(publisher.publish(messages((f"m{i}", "e.x"))), 15)
            published.append(f"m{i}")
            if len(published) == 40:
                under_way.set()

    async def restart() -> None:
        await asyncio.wait_for(under_way.wait(), 10)
        await asyncio.to_thread(private_redis.kill)
        await asyncio.sleep(0.3)  # publishes and fetches fail meanwhile, and retry
        await asyncio.to_thread(private_redis.start)
        restarted_at.append(len(published))

    async def consume() -> None:
        while len(set(received)) < total:
            got = await consumer.fetch(50, 0.5)
            received.extend(bodies(got))
            with contextlib.suppress(BackendConnectionError):
                await consumer.ack(got)

    try:
        await asyncio.wait_for(asyncio.gather(publish(), restart(), consume()), 40)
    finally:
        await reader.close()
        await publisher.close()
    assert published == [f"m{i}" for i in range(total)]
    assert restarted_at
    assert restarted_at[0] < total  # the restart came mid-publishing
    assert "retrying" in caplog.text
    assert set(received) == set(published)
    # Oldest first: the first time each message came, in publish order, except for one fetch
    # whose reply the restart cut off: Redis delivered those, the client never saw them, and
    # they come back (later) once their lease runs out.
    firsts = [int(body[1:]) for body in dict.fromkeys(received)]
    displaced = [n for i, n in enumerate(firsts) if i and n < max(firsts[:i])]
    assert len(displaced) <= 50, displaced


async def test_fetch_and_ack_resume_after_restart(private_redis: PrivateServer) -> None:
    url = with_namespace(private_redis.url, unique_namespace())
    backend = await open_redis(url)
    try:
        consumer = await backend.consumer(ConsumerSpec("c", "t", ack_wait=1.0))
        assert isinstance(consumer, RedisConsumer)
        await backend.publish(messages(("before", "t")))
        [held] = await fetch_all(consumer, 1)
        private_redis.kill()
        assert await consumer.fetch(5, 0.3) == []  # unreachable: waits, no error
        private_redis.start()
        await backend.publish(messages(("after", "t")))
        await consumer.ack([held])
        assert bodies(await fetch_all(consumer, 1)) == ["after"]
    finally:
        await backend.close()
