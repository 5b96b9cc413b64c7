"""The workload on each broker's own Python client, written by hand with the guarantees
eventwire gives: a publish returns once the broker stored the message, and the subscriber is
a durable consumer that acknowledges each message after its handler ran (at least once).

- sqlite: sqlite3 in WAL mode, ``synchronous=FULL``; the publisher inserts each chunk in one
  transaction (one message alone: a transaction of one insert); the consumer reads rows past
  its cursor and deletes them (its ack) in batches. One connection behind a lock, used from
  worker threads, as eventwire does.
- redis: redis-py asyncio; XADD pipelined (a pipeline per chunk; one message: `xadd`); a
  consumer group read with XREADGROUP in batches and XACKed in batches.
- nats: nats-py; JetStream publishes awaiting their PubAcks, many in flight; a durable pull
  consumer with explicit acks, fetched in batches, `msg.ack()` per message.
- amqp: aio-pika; a topic exchange bound to a durable quorum queue; persistent messages on a
  channel with publisher confirms, many in flight; a consumer with a prefetch window and
  manual `message.ack()`.

In the windowed mode, sqlite3 and redis-py send chunks of 50 (a transaction, a pipeline), two
in flight, their natural way of having many publishes in flight; nats-py and aio-pika keep
100 one-message publishes in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import nats
from aio_pika.abc import AbstractIncomingMessage
from common import Metrics
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from redis.asyncio import Redis

from backends.workload import (
    AMQP_URL,
    NATS_URL,
    REDIS_URL,
    TOPIC,
    Publisher,
    Recorder,
    Workload,
    measure,
    message_bytes,
    sent_ns_of,
    settle,
    unique_name,
)


async def run(backend: str, workload: Workload) -> Metrics:
    runners = {"sqlite": run_sqlite, "redis": run_redis, "nats": run_nats, "amqp": run_amqp}
    return await runners[backend](workload)


def handler(recorder: Recorder) -> Callable[[bytes], Awaitable[None]]:
    """The subscriber's handler: decode the message and record it."""

    async def handle(body: bytes) -> None:
        recorder.handled(sent_ns_of(body))

    return handle


# -- sqlite ----------------------------------------------------------------------------------


class SqliteQueue:
    """A durable queue in one SQLite file: rows are messages, deleting a row acknowledges it."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL)"
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def append(self, bodies: list[bytes]) -> None:
        """Store `bodies` in one transaction; returns once committed."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO messages (body) VALUES (?)", [(body,) for body in bodies]
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def read(self, cursor: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` messages past `cursor`, oldest first."""
        with self._lock:
            rows: list[tuple[int, bytes]] = self._db.execute(
                "SELECT seq, body FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
                (cursor, limit),
            ).fetchall()
        return rows

    def ack(self, up_to: int) -> None:
        """Acknowledge every message up to sequence number `up_to`."""
        with self._lock:
            self._db.execute("DELETE FROM messages WHERE seq <= ?", (up_to,))


async def run_sqlite(workload: Workload) -> Metrics:
    recorder = Recorder(workload)
    handle = handler(recorder)
    folder = tempfile.mkdtemp(prefix="eventwire-bench-raw-")
    queue = await asyncio.to_thread(SqliteQueue, Path(folder, "queue.db"))
    # Set by each commit of this process, so that the consumer need not poll for them.
    published = asyncio.Event()

    async def publish_chunk(count: int) -> None:
        await asyncio.to_thread(queue.append, [message_bytes() for _ in range(count)])
        published.set()

    async def publish_one() -> None:
        await publish_chunk(1)

    async def consume() -> None:
        cursor = 0
        while True:
            published.clear()
            rows = await asyncio.to_thread(queue.read, cursor, workload.batch)
            if not rows:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):  # other processes' publishes: polled
                        await published.wait()
                continue
            for _, body in rows:
                await handle(body)
            cursor = rows[-1][0]
            await asyncio.to_thread(queue.ack, cursor)

    consumer = asyncio.get_running_loop().create_task(consume())
    publisher = Publisher(publish_one, publish_chunk, windowed_in_chunks=True)
    try:
        metrics = await measure(publisher, recorder, workload)
        await settle(recorder)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await asyncio.to_thread(queue.close)
        shutil.rmtree(folder, ignore_errors=True)
    return metrics


# -- redis -----------------------------------------------------------------------------------


async def run_redis(workload: Workload) -> Metrics:
    recorder = Recorder(workload)
    handle = handler(recorder)
    stream, group = unique_name("bench_raw"), "bench"
    client = Redis.from_url(REDIS_URL)
    await client.xgroup_create(stream, group, id="$", mkstream=True)

    async def publish_chunk(count: int) -> None:
        async with client.pipeline(transaction=False) as pipe:
            for _ in range(count):
                pipe.xadd(stream, {"body": message_bytes()})
            await pipe.execute()

    async def publish_one() -> None:
        await client.xadd(stream, {"body": message_bytes()})

    async def consume() -> None:
        while True:
            # [[stream, [(entry id, {field: value}), ...]]], or None when nothing came.
            reply: Any = await client.xreadgroup(
                group, "consumer", {stream: ">"}, count=workload.batch, block=1000
            )
            if not reply:
                continue
            entries: list[tuple[bytes, dict[bytes, bytes]]] = reply[0][1]
            for _, fields in entries:
                await handle(fields[b"body"])
            await client.xack(stream, group, *(entry_id for entry_id, _ in entries))

    consumer = asyncio.get_running_loop().create_task(consume())
    publisher = Publisher(publish_one, publish_chunk, windowed_in_chunks=True)
    try:
        metrics = await measure(publisher, recorder, workload)
        await settle(recorder)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await client.delete(stream)
        await client.aclose()
    return metrics


# -- nats ------------------------------------------------------------------------------------


async def run_nats(workload: Workload) -> Metrics:
    recorder = Recorder(workload)
    handle = handler(recorder)
    name = unique_name("bench_raw")
    subject = f"{name}.{TOPIC}"
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream(timeout=10.0)
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], storage=StorageType.FILE))
    try:
        subscription = await js.pull_subscribe(
            subject,
            durable="bench",
            stream=name,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.NEW),
        )

        async def publish() -> None:
            await js.publish(subject, message_bytes(), stream=name)

        async def consume() -> None:
            while True:
                try:
                    messages = await subscription.fetch(workload.batch, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                for msg in messages:
                    await handle(msg.data)
                    await msg.ack()

        consumer = asyncio.get_running_loop().create_task(consume())
        try:
            metrics = await measure(Publisher(publish), recorder, workload)
            await settle(recorder)
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
    finally:
        await js.delete_stream(name)
        await nc.close()
    return metrics


# -- amqp ------------------------------------------------------------------------------------


async def run_amqp(workload: Workload) -> Metrics:
    recorder = Recorder(workload)
    handle = handler(recorder)
    name = unique_name("bench_raw")
    connection = await aio_pika.connect(AMQP_URL)
    try:
        publishing = await connection.channel(publisher_confirms=True)
        exchange = await publishing.declare_exchange(
            name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        consuming = await connection.channel()
        await consuming.set_qos(prefetch_count=workload.batch)
        queue = await consuming.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(name, routing_key=TOPIC)

        async def on_message(incoming: AbstractIncomingMessage) -> None:
            await handle(incoming.body)
            await incoming.ack()

        async def publish() -> None:
            await exchange.publish(
                aio_pika.Message(message_bytes(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=TOPIC,
            )

        tag = await queue.consume(on_message)
        try:
            metrics = await measure(Publisher(publish), recorder, workload)
            await settle(recorder)
        finally:
            await queue.cancel(tag)
            await queue.delete(if_unused=False, if_empty=False)
            await exchange.delete()
    finally:
        await connection.close()
    return metrics
