"""What only the nats:// backend has, against a real NATS JetStream server: the dedup window,
messages the server refuses or nats-py cannot parse, inboxes the server removes, credentials
and restarts of a private server. The contract every backend keeps is in
test_backend_contract.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import nats
import nats.js.errors
import pytest

from eventwire.backends import parse_url
from eventwire.backends.base import (
    BackendConnectionError,
    Consumer,
    ConsumerSpec,
    Delivery,
    Message,
    safe_name,
)
from eventwire.backends.nats import NatsBackend
from eventwire.backends.session import ConsumerSession
from eventwire.errors import EventwireError
from tests.backends.helpers import bodies, fetch_all, messages_on
from tests.services import (
    PrivateServer,
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


async def test_a_retried_publish_is_stored_once_within_the_dedup_window(
    backend: NatsBackend,
) -> None:
    consumer = await backend.consumer(ConsumerSpec("orders", "orders.*"))
    ids = [f"e{n}" for n in range(40)]
    await backend.publish(messages_on("orders.created", *ids))
    await backend.publish(messages_on("orders.created", "e0"))  # a retried publish
    got = await fetch_all(consumer, 40)
    assert bodies(got) == ids
    await consumer.ack(got)
    assert await consumer.fetch(10, 0.3) == []


async def test_an_acked_message_is_not_delivered_again_when_a_nak_finds_no_pull_request(
    backend: NatsBackend, nats_url: str
) -> None:
    # JetStream 2.9 moves its cursor back one message when a redelivery finds no pull request
    # able to take it: the newest message then goes out again as a first delivery, acked or
    # not. Here the only request waiting is another client's, too small for any message
    # (max_bytes 1); with eventwire's own pulls, the one standing expiring just as a nak's
    # delay ends does the same.
    consumer = await backend.consumer(ConsumerSpec("orders", "orders.*", ack_wait=1.0))
    await backend.publish(messages_on("orders.created", "e0", "e1", "e2"))
    got = await fetch_all(consumer, 3)
    assert bodies(got) == ["e0", "e1", "e2"]
    raw = await nats.connect(nats_url)
    try:
        durable = safe_name("orders")
        small = raw.new_inbox()
        await raw.subscribe(small)  # JetStream drops a request nobody listens to
        await raw.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{backend.stream}.{durable}",
            b'{"batch": 10, "expires": 5000000000, "max_bytes": 1}',
            reply=small,
        )
        waiting = 0
        async with asyncio.timeout(5):
            while waiting != 1:
                info = await raw.jetstream().consumer_info(backend.stream, durable)
                waiting = info.num_waiting or 0
        await consumer.ack(got[1:])
        await consumer.nak(got[0], 0)
        # e0 comes back (after ack_wait: JetStream dropped its redelivery), e2 never does.
        again = await fetch_all(consumer, 1)
        assert [(d.body, d.attempt > 1) for d in again] == [(b"e0", True)]
        await consumer.ack(again)
        assert await consumer.fetch(10, 0.5) == []
    finally:
        await raw.close()


async def test_a_message_the_broker_refuses_fails_the_publish_at_once(
    backend: NatsBackend,
) -> None:
    too_big = Message("big", "t.x", None, b"x" * (2 * 1024 * 1024))  # over max_payload
    with pytest.raises(EventwireError, match="refused event 'big'"):
        await asyncio.wait_for(backend.publish([too_big]), 5)


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


async def test_an_inbox_removed_by_the_server_is_made_again(backend: NatsBackend) -> None:
    # NATS removes an inbox consumer after a pause in fetching (its inactive threshold).
    inbox = await backend.consumer(ConsumerSpec("_inbox.x", "_bus.reply.x", ephemeral=True))
    await backend.delete_consumer("_inbox.x")
    assert await inbox.fetch(1, 0.2) == []
    await backend.publish(messages_on("_bus.reply.x", "reply"))
    assert bodies(await fetch_all(inbox, 1, timeout=3)) == ["reply"]
    await inbox.close()


async def test_the_next_owner_of_a_slot_gets_nothing_its_last_owner_acknowledged(
    nats_url: str,
) -> None:
    # A partition (or the router) changes hands: the last owner acks what it handled and
    # closes; the next one takes over at once, from the ack floor. JetStream applies acks
    # after answering requests: before, many of 2,000 acked events came again (9 runs of 10).
    url = parse_url(with_namespace(nats_url, unique_namespace()))
    last, next_ = NatsBackend(url), NatsBackend(url)
    await last.connect()
    await next_.connect()
    spec = ConsumerSpec("slot", "slot.*", exclusive=True)
    try:
        for round_ in range(4):
            owner = await last.consumer(spec)
            ids = [f"r{round_}e{n}" for n in range(2000)]
            await last.publish(messages_on("slot.x", *ids))
            handled = await fetch_all(owner, len(ids))
            await owner.ack(handled)
            await owner.close()
            taker = await next_.consumer(spec)
            await taker.take_over()
            assert bodies(await taker.fetch(100, 0.3)) == []
            await taker.close()
    finally:
        await last.destroy()
        await last.close()
        await next_.close()


async def test_who_runs_what_is_read_whole_while_processes_beat(nats_url: str) -> None:
    # Each beat rewrites the process's key and one of its consumers' keys; drain() reads them
    # all the while. nats-py's KeyValue.keys() missed a key rewritten during the listing
    # (about 1 read in 20): a consumer looked run by nobody, and drain() stopped waiting.
    url = parse_url(with_namespace(nats_url, unique_namespace()))
    beating, reading = NatsBackend(url), NatsBackend(url)
    await beating.connect()
    await reading.connect()
    stop = asyncio.Event()

    async def beat() -> None:
        while not stop.is_set():
            await beating.beat("worker-1", ["only"])
            await beating.beat("worker-2", ["only", "other"])

    beats = asyncio.create_task(beat())
    try:
        await beating.beat("worker-1", ["only"])  # before any read
        await beating.beat("worker-2", ["only", "other"])
        for _ in range(300):
            seen = await reading.presences()
            assert len(seen.get("only", [])) == 2, seen
            assert len(seen.get("other", [])) == 1, seen
    finally:
        stop.set()
        await beats
        await beating.destroy()
        await beating.close()
        await reading.close()


async def test_listing_consumers_misses_none_while_others_come_and_go(nats_url: str) -> None:
    # More consumers than JetStream lists in one page (256), while another process's come and
    # go: before, a deletion shifted the pages and about one listing in three missed one,
    # which drain() would have taken for a subscription with nothing left to do.
    url = parse_url(with_namespace(nats_url, unique_namespace()))
    lister, other = NatsBackend(url), NatsBackend(url)
    await lister.connect()
    await other.connect()
    kept = {f"kept{n:03d}" for n in range(270)}
    stop = asyncio.Event()

    async def come_and_go() -> None:
        turn = 0
        while not stop.is_set():
            await other.create_consumer(ConsumerSpec(f"brief{turn % 5}", "brief.*"))
            await other.delete_consumer(f"brief{(turn + 3) % 5}")
            turn += 1

    try:
        await asyncio.gather(*(lister.create_consumer(ConsumerSpec(n, "kept.*")) for n in kept))
        churn = asyncio.create_task(come_and_go())
        try:
            for _ in range(30):
                listed = [info.name for info in await lister.consumers()]
                assert kept <= set(listed), sorted(kept - set(listed))
                assert len(listed) == len(set(listed)), "a consumer listed twice"
        finally:
            stop.set()
            await churn
    finally:
        await lister.destroy()
        await lister.close()
        await other.close()


# A lost connection cancels the calls waiting on it (`_on_this_link`). A socket cannot time
# the loss to the same loop turn as an answer, so these drive the loss the way nats-py's
# disconnect callback does.
async def test_a_call_answered_as_its_connection_is_lost_leaves_the_caller_running(
    backend: NatsBackend,
) -> None:
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str] = loop.create_future()

    def answer_then_lose_the_link() -> None:
        answer.set_result("stored")  # the caller resumes first, with the answer...
        backend._dropped(backend.nc)  # ...then the loss is noticed, in the same turn

    loop.call_soon(answer_then_lose_the_link)
    assert await backend._on_this_link(answer) == "stored"
    # Before, the loss cancelled the caller anyway, at its next await: a subscription's
    # worker that had just recorded a handled id stopped for good.
    for _ in range(3):
        await asyncio.sleep(0)
    assert _cancellations_owed() == 0


async def test_a_call_that_turns_the_loss_into_another_error_leaves_no_cancellation(
    backend: NatsBackend,
) -> None:
    async def call_that_converts_its_cancellation() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise nats.errors.TimeoutError from None

    asyncio.get_running_loop().call_soon(backend._dropped, backend.nc)
    with pytest.raises(nats.errors.TimeoutError):
        await backend._on_this_link(call_that_converts_its_cancellation())
    assert _cancellations_owed() == 0
    await asyncio.sleep(0.01)  # a cancellation still owed would be raised here


async def test_a_loss_during_cleanup_after_a_cancellation_is_retried_not_taken_for_it(
    backend: NatsBackend,
) -> None:
    # Closing after a cancellation (cleanup in `finally`) runs with a cancellation owed; a loss
    # then was taken for that one, and came out as CancelledError: not retried, cleanup cut.
    loop = asyncio.get_running_loop()

    async def cleanup_after_cancellation() -> type[BaseException]:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        # The cleanup goes on with that cancellation owed.
        loop.call_soon(backend._dropped, backend.nc)
        try:
            await backend._on_this_link(asyncio.Event().wait())
        except BaseException as error:  # which one is the point
            return type(error)
        return type(None)  # pragma: no cover - the call never ends by itself

    task = loop.create_task(cleanup_after_cancellation())
    await asyncio.sleep(0)
    task.cancel()
    assert await task is nats.errors.ConnectionReconnectingError


async def test_closing_a_slot_whose_consumer_was_deleted_does_not_wait_for_it(
    backend: NatsBackend,
) -> None:
    # The last ack is confirmed at close (see the hand-over test above); with the consumer
    # deleted meanwhile (`eventwire subscriptions delete`), nothing answers: that took the
    # whole retry deadline (10 s, 30 s on a cluster), for every partition in turn.
    slot = await backend.consumer(ConsumerSpec("slot", "slot.*", exclusive=True))
    await backend.publish(messages_on("slot.x", "e1"))
    await slot.ack(await fetch_all(slot, 1))
    await backend.delete_consumer("slot")
    async with asyncio.timeout(5):  # a hang, not a speed: before, 10 s
        await slot.close()


async def test_an_id_whose_record_failed_is_skipped_here_until_the_broker_has_it(
    backend: NatsBackend,
) -> None:
    # While a cluster elects the handled-ids bucket's leader, a record fails (or hangs) and
    # the event's lease may lapse: its redelivery was handled again (a duplicate in the
    # cluster test). The session knows what it handled and skips it meanwhile.
    spec = ConsumerSpec("recording", "recording.*")
    session = ConsumerSession(await backend.consumer(spec), spec)
    await session.record_handled("stored")
    assert session.handled_here(["stored"]) == set()  # the broker answers for it now
    assert await session.consumer.handled(["stored"]) == {"stored"}
    session.consumer = _RefusingRecords(session.consumer)  # type: ignore[assignment]
    await session.record_handled("owed")
    assert session.handled_here(["owed", "stored", "other"]) == {"owed"}


class _RefusingRecords:
    """A consumer whose broker refuses to record handled ids, as while a bucket elects."""

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer

    async def ack(self, deliveries: Sequence[Delivery], *, handled_ids: Sequence[str] = ()) -> None:
        if handled_ids:
            raise nats.errors.TimeoutError
        await self._consumer.ack(deliveries)


def _cancellations_owed() -> int:
    task = asyncio.current_task()
    assert task is not None
    return task.cancelling()


async def test_destroy_deletes_the_stream(backend: NatsBackend, nats_url: str) -> None:
    await backend.consumer(ConsumerSpec("gone soon", "g"))
    await backend.destroy()
    raw = nats.NATS()
    await raw.connect(nats_url)
    try:
        with pytest.raises(nats.js.errors.NotFoundError):
            await raw.jetstream().stream_info(backend.stream)
    finally:
        await raw.close()


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


async def test_a_journal_record_whose_writer_died_before_listing_it_is_listed_by_the_next_write(
    backend: NatsBackend, nats_url: str
) -> None:
    """A record is created, then added to its run's manifest; a process killed in between
    leaves it unlisted (unread). The next write of that key, first-wins or replacing,
    lists it."""
    journal = backend.journal()
    await journal.write("agent/1", "step:plan", b"plan")
    connection = await nats.connect(nats_url)
    try:
        kv = await connection.jetstream().key_value(backend.runs_bucket)
        hashed = hashlib.sha256(b"agent/1").hexdigest()
        for key in ("status", "step:draft"):
            encoded = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
            await kv.create(f"r.{hashed}.{encoded}", b"orphan")  # created, never listed
    finally:
        await connection.close()
    assert await journal.read("agent/1") == {"step:plan": b"plan"}
    assert await journal.write("agent/1", "status", b"running", replace=True) == b"running"
    assert await journal.write("agent/1", "step:draft", b"other") == b"orphan"
    assert await journal.read("agent/1") == {
        "step:plan": b"plan",
        "status": b"running",
        "step:draft": b"orphan",
    }
