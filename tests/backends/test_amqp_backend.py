"""What only the amqp:// backend has, against a real RabbitMQ: its prefetch buffers, leases
kept by the backend itself, delay queues, the registry stream, foreign messages, reconnection
(through a local TCP proxy the tests can cut) and the history stream (?history=). The
contract every backend keeps is in test_backend_contract.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import aiormq
import pytest

from eventwire.backends import open_backend
from eventwire.backends.amqp import AmqpBackend
from eventwire.backends.base import (
    BackendCapabilityError,
    BackendConnectionError,
    Consumer,
    ConsumerSpec,
    Delivery,
    Message,
)
from eventwire.backends.broker import BrokerBackend
from tests.backends.helpers import bodies, fetch_all, messages
from tests.services import require_service, unique_namespace, with_namespace

URL = require_service("rabbitmq")
RABBIT = ("127.0.0.1", 5672)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


class Opener:
    """Opens connected backends on one namespace; destroys the namespace afterwards."""

    def __init__(self) -> None:
        self.namespace = unique_namespace()
        self.url = with_namespace(URL, self.namespace)
        self.opened: list[AmqpBackend] = []

    async def __call__(self, url: str | None = None) -> AmqpBackend:
        backend = open_backend(url or self.url)
        assert isinstance(backend, AmqpBackend)
        self.opened.append(backend)
        await backend.connect()
        return backend

    async def cleanup(self) -> None:
        for backend in self.opened:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await backend.close()
        cleaner = open_backend(self.url)
        assert cleaner is not None
        await cleaner.connect()
        await cleaner.destroy()
        await cleaner.close()


@pytest.fixture
async def opener() -> AsyncIterator[Opener]:
    opening = Opener()
    yield opening
    await opening.cleanup()


@pytest.fixture
async def backend(opener: Opener) -> AmqpBackend:
    return await opener()


@pytest.fixture
async def raw() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A plain aio-pika channel, as another producer would use."""
    connection = await aio_pika.connect(host=RABBIT[0], port=RABBIT[1])
    yield await connection.channel()
    await connection.close()


class Proxy:
    """A TCP proxy to RabbitMQ that can drop every connection and refuse new ones."""

    def __init__(self) -> None:
        self.accepting = True
        self.links: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Proxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        self.cut()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def url(self, namespace: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/?namespace={namespace}&heartbeat=5"

    def cut(self) -> None:
        for writer in list(self.links):
            writer.transport.abort()
        self.links.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*RABBIT)
        except OSError:
            writer.transport.abort()
            return
        self.links |= {writer, up_writer}
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.transport.abort()


async def exists(name: str) -> bool:
    """Whether queue `name` exists, asked with a plain connection."""
    connection = await aio_pika.connect(host=RABBIT[0], port=RABBIT[1])
    try:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True
    finally:
        await connection.close()


# -- prefetch buffers, and leases kept by the backend ------------------------------------------


async def test_a_small_prefetch_still_shares_without_duplicates(opener: Opener) -> None:
    url = f"{opener.url}&prefetch=5"
    first, second = await opener(url), await opener(url)
    one = await first.consumer(ConsumerSpec("workers", "jobs.*"))
    two = await second.consumer(ConsumerSpec("workers", "jobs.*"))
    ids = [f"j{i}" for i in range(200)]
    await first.publish(messages(*[(i, "jobs.run") for i in ids]))
    seen: dict[str, list[str]] = {"one": [], "two": []}

    async def work(name: str, consumer: Consumer) -> None:
        while sum(map(len, seen.values())) < len(ids):
            got = await consumer.fetch(3, 0.2)
            seen[name] += bodies(got)
            await asyncio.sleep(0.001)  # let the other one take its turn
            await consumer.ack(got)

    async with asyncio.timeout(15):
        await asyncio.gather(work("one", one), work("two", two))
    everything = seen["one"] + seen["two"]
    assert sorted(everything) == sorted(ids)  # each exactly once
    assert seen["one"]
    assert seen["two"]


async def test_the_backend_gives_back_what_it_held_past_ack_wait_and_ignores_a_late_ack(
    opener: Opener,
) -> None:
    stuck_backend, live_backend = await opener(), await opener()
    stuck = await stuck_backend.consumer(ConsumerSpec("w", "t.*", ack_wait=1.0))
    live = await live_backend.consumer(ConsumerSpec("w", "t.*", ack_wait=1.0))
    await stuck_backend.publish(messages(("m", "t.x")))
    held = await stuck.fetch(1, 5.0) or await live.fetch(1, 5.0)
    assert bodies(held) == ["m"]
    # Whoever holds it never acks (as if its handler hung): the other gets it after ack_wait.
    holder, other = (stuck, live) if held[0].handle in stuck._held.values() else (live, stuck)  # type: ignore[attr-defined]
    started = time.monotonic()
    again = await fetch_all(other, 1, timeout=5.0)
    assert 0.8 < time.monotonic() - started < 3.5
    assert bodies(again) == ["m"]
    assert again[0].attempt == 2
    await holder.ack(held)  # too late: ignored, must not disturb the channel
    await other.ack(again)
    assert await other.fetch(1, 0.3) == []
    assert await holder.fetch(1, 0.1) == []


async def test_an_idle_consumer_gives_its_buffer_to_a_competing_one(opener: Opener) -> None:
    first, second = await opener(), await opener()
    idle = await first.consumer(ConsumerSpec("w", "t.*", ack_wait=1.0))
    busy = await second.consumer(ConsumerSpec("w", "t.*", ack_wait=1.0))
    ids = [f"m{i}" for i in range(20)]
    await first.publish(messages(*[(i, "t.x") for i in ids]))
    # Both are subscribed, so about half went to `idle`'s prefetch buffer; it never fetches.
    # Acknowledged as they come: held past ack_wait (a slow machine) they would come again.
    got: list[str] = []
    async with asyncio.timeout(10):
        while len(got) < len(ids):
            batch = await busy.fetch(len(ids), 0.5)
            got += bodies(batch)
            await busy.ack(batch)
    assert sorted(got) == sorted(ids)
    assert idle.in_flight == 0  # type: ignore[attr-defined]


async def test_redelivery_at_once_when_the_holding_process_dies(opener: Opener) -> None:
    survivor = await opener()
    async with Proxy() as proxy:
        doomed = await opener(proxy.url(opener.namespace))
        dying = await doomed.consumer(ConsumerSpec("w", "t.*", ack_wait=30.0))
        live = await survivor.consumer(ConsumerSpec("w", "t.*", ack_wait=30.0))
        await survivor.publish(messages(("m", "t.x")))
        held = await dying.fetch(1, 5.0)
        if not held:  # the broker gave it to the survivor: hand it over
            mine = await live.fetch(1, 1.0)
            await live.nak(mine[0], 0)
            held = await dying.fetch(1, 5.0)
        assert bodies(held) == ["m"]
        proxy.accepting = False
        proxy.cut()  # the connection dies as with SIGKILL: the broker returns its deliveries
        again = await fetch_all(live, 1, timeout=5.0)
        assert bodies(again) == ["m"]
        assert again[0].attempt >= 2
        await live.ack(again)


async def test_acks_from_a_closed_consumer_are_ignored(backend: AmqpBackend) -> None:
    consumer = await backend.consumer(ConsumerSpec("w", "t.*"))
    await backend.publish(messages(("a", "t.x"), ("b", "t.x")))
    got = await fetch_all(consumer, 2)
    await consumer.close()
    reopened = await backend.consumer(ConsumerSpec("w", "t.*"))  # in the same process
    again = await fetch_all(reopened, 2)
    await consumer.ack(got)  # delivery tags of a closed channel: ignored
    await reopened.ack(again)
    assert await reopened.fetch(1, 0.3) == []


# -- consumers(), foreign messages, queues ---------------------------------------------------


async def test_only_the_holding_process_counts_what_it_holds_and_inboxes_are_not_listed(
    backend: AmqpBackend, opener: Opener
) -> None:
    await backend.consumer(ConsumerSpec("seen", "s.>"))
    other = await opener()
    await other.publish(messages(("s", "s.a.b")))
    # Buffered or held by the first process: only that process can count it (see the
    # contract for what every process counts once it is given back).
    assert [c.outstanding for c in await backend.consumers()] == [1]
    ephemeral = await backend.consumer(ConsumerSpec("inbox-1", "_bus.reply.1", ephemeral=True))
    assert [c.name for c in await other.consumers()] == ["seen"]  # only durable consumers
    await ephemeral.close()


async def test_foreign_malformed_messages_are_delivered(
    backend: AmqpBackend, opener: Opener, raw: aio_pika.abc.AbstractChannel
) -> None:
    consumer = await backend.consumer(ConsumerSpec("tolerant", "f.*"))
    exchange = await raw.get_exchange(backend.exchange)
    await exchange.publish(aio_pika.Message(b"\xff\x00garbage"), routing_key="f.x")
    await exchange.publish(
        aio_pika.Message(
            b"",
            headers={"eventwire-attempt": "lots", "eventwire-topic": 7, "x-delivery-count": "?"},
        ),
        routing_key="f.y",
    )
    # Straight into the queue, no exchange, no body, no properties.
    await raw.default_exchange.publish(
        aio_pika.Message(b""), routing_key=backend.queue_name("tolerant")
    )
    await backend.publish(messages(("fine", "f.z")))
    got = await fetch_all(consumer, 4)
    assert [(d.topic, d.body, d.attempt) for d in got] == [
        ("f.x", b"\xff\x00garbage", 1),
        ("f.y", b"", 1),
        ("", b"", 1),
        ("f.z", b"fine", 1),
    ]
    await consumer.ack(got)
    # Garbage in the registry stream does not disturb anyone.
    await raw.default_exchange.publish(
        aio_pika.Message(b"{not json"), routing_key=backend.registry_stream
    )
    await raw.default_exchange.publish(
        aio_pika.Message(b'{"op": "consumer", "name": 3}'), routing_key=backend.registry_stream
    )
    assert [c.name for c in await backend.consumers()] == ["tolerant"]
    assert [c.name for c in await (await opener()).consumers()] == ["tolerant"]


async def test_an_inbox_queue_is_deleted_on_close(backend: AmqpBackend) -> None:
    inbox = await backend.consumer(ConsumerSpec("reply inbox", "_bus.reply.abc", ephemeral=True))
    assert await exists(backend.queue_name("reply inbox"))
    await inbox.close()
    assert not await exists(backend.queue_name("reply inbox"))


async def test_delete_and_destroy_remove_the_queues_every_process_made(
    backend: AmqpBackend, opener: Opener
) -> None:
    await backend.consumer(ConsumerSpec("doomed", "d.*"))
    kept = await backend.consumer(ConsumerSpec("kept", "k.*"))
    await backend.delete_consumer("doomed")
    assert not await exists(backend.queue_name("doomed"))
    await backend.publish(messages(("n", "k.x")))
    await kept.nak((await fetch_all(kept, 1))[0], 0.05)  # declares a delay queue
    await kept.ack(await fetch_all(kept, 1))
    cleaner = await opener()  # another process destroys what every process created
    await cleaner.destroy()
    for queue in (
        backend.queue_name("kept"),
        backend.registry_stream,
        f"{backend.delay_exchange}.50",
    ):
        assert not await exists(queue), queue


# -- connection errors and reconnection ------------------------------------------------------


async def test_connect_with_wrong_credentials(opener: Opener) -> None:
    backend = open_backend("amqp://guest:not-the-password@127.0.0.1:5672/?namespace=x")
    assert isinstance(backend, BrokerBackend)
    with pytest.raises(BackendConnectionError) as info:
        await backend.connect()
    assert "not-the-password" not in str(info.value)
    assert "***" in str(info.value)


async def test_publish_during_a_connection_loss_is_retried(opener: Opener) -> None:
    observer = await opener()
    watcher = await observer.consumer(ConsumerSpec("watch", "p.*"))
    async with Proxy() as proxy:
        flaky = await opener(proxy.url(opener.namespace))
        await flaky.publish(messages(("before", "p.x")))
        proxy.accepting = False
        proxy.cut()
        publishing = asyncio.create_task(flaky.publish(messages(("during", "p.x"))))
        await asyncio.sleep(0.5)
        assert not publishing.done()  # still retrying
        proxy.accepting = True
        async with asyncio.timeout(10):
            await publishing
        # A batch cut in the middle: every message whose publish returned is delivered.
        batch = asyncio.create_task(
            flaky.publish(messages(*[(f"b{i}", "p.x") for i in range(2000)]))
        )
        await asyncio.sleep(0.01)
        proxy.cut()
        async with asyncio.timeout(15):
            await batch
    got = bodies(await fetch_all(watcher, 2002, timeout=10))
    # At least once: a message whose confirm was lost in the cut may come twice.
    assert set(got) == {"before", "during", *(f"b{i}" for i in range(2000))}


async def test_fetch_continues_after_reconnect(opener: Opener) -> None:
    publisher = await opener()
    async with Proxy() as proxy:
        flaky = await opener(proxy.url(opener.namespace))
        consumer = await flaky.consumer(ConsumerSpec("survivor", "f.*"))
        await publisher.publish(messages(("a", "f.x")))
        held = await fetch_all(consumer, 1)
        proxy.cut()
        await publisher.publish(messages(("b", "f.x")))
        got = await fetch_all(consumer, 2, timeout=10)
        # "a" went back to the queue with the lost connection, so it comes again first ("b"
        # too may have been sent to the lost connection before the broker noticed).
        assert bodies(got) == ["a", "b"]
        assert got[0].attempt == 2
        await consumer.ack(held)  # from the lost connection: ignored
        await consumer.ack(got)
        assert await consumer.fetch(1, 0.3) == []
        assert [c.outstanding for c in await flaky.consumers()] == [0]


# -- history stream (?history=) ------------------------------------------------------------


async def test_history_stream_reads_back_past_events_with_an_exact_end(opener: Opener) -> None:
    backend = await opener(opener.url + "&history=1d")
    await backend.publish(messages(("h1", "orders.new"), ("h2", "users.new"), ("h3", "orders.x")))
    assert await backend.keeps_history()
    reader = await backend.consumer(
        ConsumerSpec("_eventwire.test.1", "orders.*", "earliest", ephemeral=True)
    )
    try:
        got = await fetch_all(reader, 2)
        assert bodies(got) == ["h1", "h3"]  # in stored order, filtered by the pattern
        assert [d.topic for d in got] == ["orders.new", "orders.x"]
        # The reader's own marker ends the read: then nothing is outstanding for it.
        assert await reader.fetch(10, 1.0) == []
        infos = {info.name: info.outstanding for info in await backend.consumers()}
        assert infos["_eventwire.test.1"] == 0
    finally:
        await reader.close()
    assert "_eventwire.test.1" not in {info.name for info in await backend.consumers()}


async def read_stream(reader: Consumer, count: int, timeout: float = 10.0) -> list[Delivery]:
    """Fetch and acknowledge, as history readers do, until `count` deliveries came."""
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} came"
        batch = await reader.fetch(count - len(got), 0.5)
        await reader.ack(batch)
        got += batch
    return got


async def test_history_reader_goes_on_after_its_channel_is_lost(opener: Opener) -> None:
    backend = await opener(opener.url + "&history=on")
    total = 3_000  # more than the reader's prefetch: some are still on the broker
    await backend.publish(messages(*[(f"e{n}", "t.x") for n in range(total)]))
    spec = ConsumerSpec("_eventwire.test.2", ">", "earliest", ephemeral=True)
    reader = await backend.consumer(spec)
    try:
        first = await read_stream(reader, 500)
        channel = reader._channel  # type: ignore[attr-defined]
        assert channel is not None
        await channel.close()
        rest = await read_stream(reader, total - 500)
        assert bodies(first + rest) == [f"e{n}" for n in range(total)]  # none twice, none lost
        assert await reader.fetch(10, 1.0) == []
        assert reader.outstanding == 0  # type: ignore[attr-defined]
    finally:
        await reader.close()


async def test_a_read_ends_at_what_was_there_when_it_began(opener: Opener) -> None:
    """On a busy bus the read still ends: what is published after it began is not part of
    it, and a slow reader does not pull the whole stream into memory."""
    backend = await opener(opener.url + "&history=1d")
    await backend.publish(messages(*[(f"old{n}", "t.x") for n in range(2_000)]))
    spec = ConsumerSpec("_eventwire.test.4", ">", "earliest", ephemeral=True)
    reader = await backend.consumer(spec)
    try:
        await backend.publish(messages(*[(f"new{n}", "t.x") for n in range(50)]))
        buffer = reader._buffer  # type: ignore[attr-defined]

        async def window_full() -> bool:
            return len(buffer) >= 1_000

        await eventually(window_full)  # a slow reader: nothing fetched yet
        await backend.publish(messages(("later", "t.x")))  # a round trip: more had time to come
        assert len(buffer) == 1_000  # the prefetch: the rest waits on the broker
        got = await read_stream(reader, 2_000)
        assert bodies(got) == [f"old{n}" for n in range(2_000)]
        assert await reader.fetch(100, 1.0) == []
        assert reader.outstanding == 0  # type: ignore[attr-defined]
    finally:
        await reader.close()
    # Closing a reader midway, while what it does not want pours in (and is acknowledged),
    # leaves the backend's connection, which the app's consumers share, working.
    connection = backend._conn
    assert connection is not None
    spec = ConsumerSpec("_eventwire.test.5", "nothing.here", "earliest", ephemeral=True)
    early = await backend.consumer(spec)
    await early.close()
    await backend.publish(messages(("after", "t.x")))  # a round trip after the close
    assert backend._conn is connection
    assert not connection.is_closed


async def test_without_a_history_stream_a_read_is_refused_clearly(backend: AmqpBackend) -> None:
    assert not await backend.keeps_history()
    with pytest.raises(BackendCapabilityError, match=r"\?history=7d"):
        await backend.consumer(ConsumerSpec("_eventwire.test.3", ">", "earliest", ephemeral=True))


async def test_history_option_is_checked(opener: Opener) -> None:
    with pytest.raises(ValueError, match=r"history='forever'.*e\.g\. history=7d"):
        open_backend(opener.url + "&history=forever")
    await opener(opener.url + "&history=1d")
    other = open_backend(opener.url + "&history=2h")
    assert other is not None
    with pytest.raises(ValueError, match="same history= in every process"):
        await other.connect()
    await other.close()


async def test_consumers_past_a_connections_channels_go_on_more_connections(
    backend: AmqpBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RabbitMQ allows 2,047 channels a connection and each consumer has one: past a few
    (here 4) a process opens another connection for the next ones, and all keep working."""
    import eventwire.backends.amqp as amqp_backend

    monkeypatch.setattr(amqp_backend, "_CHANNELS_PER_CONNECTION", 4)
    consumers = [await backend.consumer(ConsumerSpec(f"c{n}", f"spread.{n}")) for n in range(10)]
    for consumer in consumers:  # each subscribes on its first fetch
        assert await consumer.fetch(1, 0.05) == []
    # The main connection holds 4 (its own channels count), the others 4 each: 3 or more.
    assert backend.connections >= 3
    await backend.publish(messages(*[(f"m{n}", f"spread.{n}") for n in range(10)]))
    for n, consumer in enumerate(consumers):
        got = await fetch_all(consumer, 1)
        assert bodies(got) == [f"m{n}"]
        await consumer.ack(got)
    for consumer in consumers:
        await consumer.close()


async def test_classic_queues_are_classic_and_a_queue_of_the_other_type_is_refused(
    opener: Opener, raw: aio_pika.abc.AbstractChannel
) -> None:
    with pytest.raises(ValueError, match=r"queues='lazy'.*one of quorum, classic"):
        open_backend(opener.url + "&queues=lazy")
    classic = await opener(opener.url + "&queues=classic")
    await classic.create_consumer(ConsumerSpec("light", "light.>"))
    # The broker says which type the queue is: declaring it as quorum is refused.
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="inequivalent arg"):
        await raw.declare_queue(
            classic.queue_name("light"), durable=True, arguments={"x-queue-type": "quorum"}
        )
    quorum = await opener()
    with pytest.raises(ValueError, match=r"other settings than this URL's quorum.*\?queues="):
        await quorum.consumer(ConsumerSpec("light", "light.>"))
    # The refusal cost nothing else: the backend goes on working.
    consumer = await quorum.consumer(ConsumerSpec("heavy", "heavy.>"))
    await quorum.publish([Message("h1", "heavy.one", None, b"h1")])
    [delivery] = await fetch_all(consumer, 1)
    assert delivery.body == b"h1"
    await consumer.ack([delivery])
