"""What only the redis:// backend has, against a real Redis: stream entries, the dedup window,
replies lost mid-publish, trimming, pruning, restarts of a private server. The contract every
backend keeps is in test_backend_contract.py."""

from __future__ import annotations

import asyncio
import contextlib
import random
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
    Message,
)
from eventwire.backends.broker import BrokerBackend
from eventwire.backends.redis import RedisBackend, RedisConsumer
from eventwire.topics import pattern_matches
from tests.backends.helpers import bodies, fetch_all, messages
from tests.services import (
    PrivateServer,
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


async def test_a_start_time_counts_to_the_millisecond_of_the_stream_ids(
    backend: RedisBackend, raw: Redis
) -> None:
    await backend.publish(messages(("old", "t")))
    [(old_id, _)] = await raw.xrange(backend.stream)
    old_ms = int(old_id.split(b"-")[0])
    # Wait until the server clock is past the old entry's millisecond.
    deadline = time.monotonic() + 5
    while int((await raw.time())[0]) * 1000 + (await raw.time())[1] // 1000 <= old_ms:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.002)
    after = await backend.consumer(
        ConsumerSpec("after", "t", start=datetime.fromtimestamp((old_ms + 1) / 1000, UTC))
    )
    at = await backend.consumer(
        ConsumerSpec("at", "t", start=datetime.fromtimestamp(old_ms / 1000, UTC))
    )
    await backend.publish(messages(("new", "t")))
    assert bodies(await fetch_all(after, 1)) == ["new"]
    assert bodies(await fetch_all(at, 2)) == ["old", "new"]


async def test_nak_zero_wakes_another_consumer_of_the_group_blocked_in_fetch(
    backend: RedisBackend,
) -> None:
    spec = ConsumerSpec("n", "n")
    first = await backend.consumer(spec)
    second = await backend.consumer(spec)
    await backend.publish(messages(("n1", "n")))
    [delivery] = await fetch_all(second, 1)
    waiting = asyncio.create_task(first.fetch(5, 5.0))
    await asyncio.sleep(0.1)  # let the fetch block first: the group's wake stream must end it
    handed = time.monotonic()
    await second.nak(delivery, 0)
    [again] = await asyncio.wait_for(waiting, 5)
    assert time.monotonic() - handed < 2.5  # woken, not at the end of its wait
    assert (again.body, again.attempt) == (b"n1", 2)


def _connections(backend: RedisBackend) -> int:
    """The connections (idle and in use) of the backend's pool."""
    return sum(count for count, _ in backend.client.connection_pool.get_connection_count())


async def test_thousands_of_waiting_consumers_share_a_few_connections(
    backend: RedisBackend,
) -> None:
    # Each waiting fetch once blocked on a connection of its own: past the pool's 1,000,
    # fetches failed (and the event for the last consumer never came).
    consumers = [await backend.consumer(ConsumerSpec(f"c{i}", f"many.c{i}")) for i in range(2000)]
    try:
        assert not any(await asyncio.gather(*(c.fetch(10, 0.2) for c in consumers)))
        fetches = [asyncio.create_task(c.fetch(10, 10.0)) for c in consumers]
        try:
            await backend.publish(messages(("last", "many.c1999")))
            [delivery] = await asyncio.wait_for(fetches[-1], 5.0)
            assert delivery.body == b"last"
            assert not any(f.done() for f in fetches[:-1])  # nobody else got anything
            assert _connections(backend) < 200  # 16 fetching on their own, 64 shared
        finally:
            for fetch in fetches:
                fetch.cancel()
            await asyncio.gather(*fetches, return_exceptions=True)
    finally:
        for consumer in consumers:
            await consumer.close()


async def _calls(raw: Redis, name: str) -> int:
    """How many times the server ran command `name` (``xgroup|setid`` for a subcommand)."""
    stats: dict[str, Any] = await raw.info("commandstats")
    return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))


async def _consume(consumer: RedisConsumer, got: list[str], stop: asyncio.Event) -> None:
    """Fetch, record and acknowledge until `stop` is set."""
    while not stop.is_set():
        deliveries = await consumer.fetch(10, 0.3)
        got.extend(bodies(deliveries))
        await consumer.ack(deliveries)


async def test_woken_idle_groups_skip_what_came_for_others_and_miss_nothing(
    raw: Redis,
) -> None:
    # Two processes (backends) share groups; 40 groups on 8 topics (and one on all), so most
    # consumers wait on the waker and are woken now and then, far behind the stream. A woken
    # group moves past the entries the waker saw were for others in one step (XGROUP SETID)
    # instead of reading and acknowledging each; no event for it may be skipped with them.
    namespace = unique_namespace()
    first = await open_redis(with_namespace(URL, namespace))
    second = await open_redis(with_namespace(URL, namespace))
    patterns = {f"g{i}": f"skip.t{i % 8}" for i in range(40)} | {"all": "skip.*"}
    consumers = [await first.consumer(ConsumerSpec(g, p)) for g, p in patterns.items()]
    consumers += [await second.consumer(ConsumerSpec(g, p)) for g, p in patterns.items()][::3]
    got: dict[str, list[str]] = {group: [] for group in patterns}
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_consume(c, got[c.spec.name], stop)) for c in consumers]
    try:
        setids = await _calls(raw, "xgroup|setid")
        chooser = random.Random(7)
        published: list[tuple[str, str]] = []
        for burst in range(30):
            # Mostly one hot topic, so the others' groups fall far behind it.
            batch = [
                (f"e{burst}.{n}", f"skip.t{0 if chooser.random() < 0.8 else chooser.randrange(8)}")
                for n in range(chooser.randrange(1, 60))
            ]
            published += batch
            await first.publish(messages(*batch))
            if chooser.random() < 0.5:
                await asyncio.sleep(0.05)  # consumers go back to waiting
        expected = {
            group: sorted(event for event, topic in published if pattern_matches(pattern, topic))
            for group, pattern in patterns.items()
        }
        deadline = time.monotonic() + 20
        while any(len(got[g]) < len(expected[g]) for g in patterns):
            assert time.monotonic() < deadline, "events went missing"
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert {group: sorted(events) for group, events in got.items()} == expected
        assert await _calls(raw, "xgroup|setid") > setids  # the skip did happen
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for consumer in consumers:
            await consumer.close()
        await first.destroy()
        await first.close()
        await second.close()


async def test_blocking_readers_woken_for_other_topics_turn_to_the_waker(
    backend: RedisBackend, raw: Redis
) -> None:
    # Each of the first 16 consumers blocks in a read of its own, which every entry wakes:
    # with 16 subscriptions on different topics, a publish cost 16 reads and 15
    # acknowledgements of entries for others. Those woken mostly for others turn to the
    # waker, which wakes only the consumer an entry is for.
    consumers = [await backend.consumer(ConsumerSpec(f"b{i}", f"block.t{i}")) for i in range(16)]
    got: dict[str, list[str]] = {c.spec.name: [] for c in consumers}
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_consume(c, got[c.spec.name], stop)) for c in consumers]
    try:
        reads = await _calls(raw, "xreadgroup")
        for n in range(200):
            await backend.publish(messages((f"x{n}", "block.t0")))
            deadline = time.monotonic() + 5
            while len(got["b0"]) <= n:
                assert time.monotonic() < deadline, f"x{n} did not come"
                await asyncio.sleep(0.001)
        reads = await _calls(raw, "xreadgroup") - reads
        # Before: about 16 reads a publish (3,200); now the others stop after about 8 each.
        assert reads < 1200, reads
        assert got["b0"] == [f"x{n}" for n in range(200)]
        assert not any(got[f"b{i}"] for i in range(1, 16))
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for consumer in consumers:
            await consumer.close()


async def test_a_presence_beat_is_one_field_however_many_consumers_the_process_runs(
    backend: RedisBackend, raw: Redis
) -> None:
    names = [f"c{n}" for n in range(2000)]
    await backend.beat("p1", names)
    first = await backend.presences()
    assert sorted(first) == sorted(names)
    fields = await raw.hgetall(backend.presence_key)
    await backend.beat("p1", names)
    # The consumers' fields were not written again, yet every consumer's time moved with
    # the process's beat.
    assert await raw.hgetall(backend.presence_key) == fields
    second = await backend.presences()
    assert all(second[name][0] >= first[name][0] for name in names)
    assert second["c0"][0] > first["c0"][0]
    await backend.leave("p1", names[:1])
    left = await backend.presences()
    assert left["c0"][0] < 0 < left["c1"][0]  # stopped running c0, still runs c1


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

    async def reply_lost_once(batch: Sequence[Message], stream: str) -> None:
        tries.append([m.id for m in batch])
        if len(tries) == 1:
            # The server stored part of the batch (or all, or none); the reply never came.
            await send(batch[:stored_before_loss], stream)
            raise redis_errors.ConnectionError("connection reset while reading the reply")
        await send(batch, stream)

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
    assert await backend._stored_since(wanted, 60.0, backend.stream) == {"e5", "e1500", "e1999"}
    await asyncio.sleep(0.01)
    assert (
        await backend._stored_since(wanted, 0.0, backend.stream) == set()
    )  # nothing added since now


async def test_entries_hold_id_topic_body_and_a_key_only_when_set(
    backend: RedisBackend, raw: Redis
) -> None:
    await backend.publish(
        [Message(f"b{n}", "t", f"k{n}" if n % 2 else None, b"x") for n in range(4)]
    )
    entries: Any = await raw.xrange(backend.stream, count=4)
    assert [fields.get(b"key") for _, fields in entries] == [None, b"k1", None, b"k3"]
    assert list(entries[0][1]) == [b"id", b"topic", b"body"]


async def test_one_fetch_returns_redeliveries_oldest_first_then_new_entries(
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


async def test_a_topicless_entry_is_claimed_once_by_its_first_reporter(
    backend: RedisBackend,
) -> None:
    assert await backend.first_to_report("1-0", "audit")
    assert not await backend.first_to_report("1-0", "billing")
    # Its letter could not be stored, the entry came back: the same reporter claims it again.
    assert await backend.first_to_report("1-0", "audit")
    assert await backend.first_to_report("2-0", "billing")


async def test_foreign_malformed_entries_are_delivered(backend: RedisBackend, raw: Redis) -> None:
    consumer = await backend.consumer(ConsumerSpec("f", "orders.>"))
    await raw.xadd(backend.stream, {"junk": b"\xff\x00"})  # no topic, no body
    await raw.xadd(backend.stream, {"topic": b"\xfe\xff bad", "body": b"\x00garbage"})
    await raw.xadd(backend.stream, {"topic": "orders.x", "body": b"not an envelope"})
    await raw.xadd(backend.stream, {"topic": "other.x", "body": b"for nobody here"})
    await backend.publish(messages(("ok", "orders.new")))
    got = await fetch_all(consumer, 4)
    # As the producer wrote them: a foreign entry's fields all come (the body to a decoder or
    # a dead letter, the other fields as headers), with its entry id as the message id.
    wrote = [consumer.foreign(d) for d in got]
    assert [(m.topic, m.body, dict(m.headers)) for m in wrote] == [
        ("", b"", {"junk": "\ufffd\x00"}),
        ("\ufffd\ufffd bad", b"\x00garbage", {}),
        ("orders.x", b"not an envelope", {}),
        ("orders.new", b"ok", {}),
    ]
    assert [m.message_id for m in wrote] == [d.handle for d in got]
    assert got[3].body == b"ok"  # eventwire's own entry: its body alone
    await consumer.ack(got)
    assert await consumer.fetch(5, 0.1) == []


async def test_destroy_unlinks_every_key_of_the_namespace_only(
    backend: RedisBackend, raw: Redis
) -> None:
    async with own_namespace() as other:
        await other.publish(messages(("kept", "g")))
        consumer = await backend.consumer(ConsumerSpec("gone", "g"))
        await backend.publish(messages(("g1", "g")))
        await consumer.ack(await fetch_all(consumer, 1), handled_ids=["g1"])
        assert await raw.keys(backend.stream.replace("events", "*")) != []
        await backend.destroy()
        assert await raw.keys(backend.stream.replace("events", "*")) == []
        assert await raw.xlen(other.stream) == 1


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
