"""The workload on FastStream, with the settings closest to eventwire's guarantees. The broker
runs in-process (`await broker.start()`), and its access log is off (``logger=None``), as
eventwire logs nothing per event either.

- redis: a Redis Streams subscriber with a consumer group (`StreamSub(group=, consumer=)`),
  reading up to `batch` entries per XREADGROUP and XACKing each message after its handler.
  Publishing: `broker.publish(..., stream=, pipeline=pipe)` for each message of a chunk, then
  one `pipe.execute()` (FastStream's pipelining for Redis): the chunk is stored once it returns.
  One message alone: `broker.publish(..., stream=)`. The windowed mode sends chunks of 50,
  two in flight: 100 concurrent `broker.publish` calls fail now and then with redis-py's
  `MaxConnectionsError`.
- nats: a JetStream (file storage) durable pull subscriber (`PullSub(batch_size=batch)`) that
  acks each message after its handler; `broker.publish(..., stream=)` awaits the PubAck, with
  a chunk of them in flight at once (`asyncio.gather`).
- amqp: a topic exchange bound to a durable quorum queue, consumed on a channel with a prefetch
  of `batch`, each message acked after its handler; `broker.publish(..., persist=True)` on the
  default channel, which has publisher confirms on and returns once the broker confirmed, a
  chunk of them in flight at once.

Every subscriber uses ``AckPolicy.NACK_ON_ERROR``: acknowledged after its handler succeeded,
given back for redelivery if it failed (eventwire retries and then dead-letters).
"""

from __future__ import annotations

from typing import Any

import aio_pika
import nats
from common import Metrics
from faststream import AckPolicy
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.rabbit import (
    Channel,
    ExchangeType,
    QueueType,
    RabbitBroker,
    RabbitExchange,
    RabbitQueue,
)
from faststream.redis import RedisBroker, StreamSub
from nats.js.api import StorageType
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
    message,
    settle,
    unique_name,
)

PUBLISH_TIMEOUT = 30.0


async def run(backend: str, workload: Workload) -> Metrics:
    runners = {"redis": run_redis, "nats": run_nats, "amqp": run_amqp}
    if backend not in runners:
        raise ValueError(f"FastStream has no {backend} broker")
    return await runners[backend](workload)


async def run_redis(workload: Workload) -> Metrics:
    recorder = Recorder(workload)
    stream = unique_name("bench_fs")
    broker = RedisBroker(REDIS_URL, logger=None)  # type: ignore[arg-type]  # None: no log

    @broker.subscriber(
        stream=StreamSub(
            stream,
            group="bench",
            consumer="consumer",
            max_records=workload.batch,
            polling_interval=1000,
        ),
        ack_policy=AckPolicy.NACK_ON_ERROR,
    )
    async def on_message(body: dict[str, Any]) -> None:
        recorder.handled(body["sent_ns"])

    await broker.start()
    client = await broker.connect()
    try:

        async def publish_chunk(count: int) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for _ in range(count):
                    await broker.publish(message(), stream=stream, pipeline=pipe)
                await pipe.execute()

        async def publish_one() -> None:
            await broker.publish(message(), stream=stream)

        # Concurrent publishes exhaust redis-py's pool (even 100, now and then): the windowed
        # mode sends chunks, as for redis-py.
        publisher = Publisher(publish_one, publish_chunk, windowed_in_chunks=True)
        metrics = await measure(publisher, recorder, workload)
        await settle(recorder)
    finally:
        await broker.stop()
        cleaner = Redis.from_url(REDIS_URL)
        await cleaner.delete(stream)
        await cleaner.aclose()
    return metrics


async def run_nats(workload: Workload) -> Metrics:
    recorder = Recorder(workload)
    name = unique_name("bench_fs")
    subject = f"{name}.{TOPIC}"
    broker = NatsBroker(NATS_URL, logger=None)

    @broker.subscriber(
        subject,
        stream=JStream(name, subjects=[f"{name}.>"], storage=StorageType.FILE),
        durable="bench",
        pull_sub=PullSub(batch_size=workload.batch, timeout=1.0),
        ack_policy=AckPolicy.NACK_ON_ERROR,
    )
    async def on_message(body: dict[str, Any]) -> None:
        recorder.handled(body["sent_ns"])

    async def publish() -> None:
        await broker.publish(message(), subject, stream=name, timeout=PUBLISH_TIMEOUT)

    await broker.start()
    try:
        metrics = await measure(Publisher(publish), recorder, workload)
        await settle(recorder)
    finally:
        await broker.stop()
        await delete_nats_stream(name)
    return metrics


async def delete_nats_stream(name: str) -> None:
    nc = await nats.connect(NATS_URL)
    try:
        await nc.jetstream().delete_stream(name)
    finally:
        await nc.close()


async def run_amqp(workload: Workload) -> Metrics:
    recorder = Recorder(workload)
    name = unique_name("bench_fs")
    broker = RabbitBroker(AMQP_URL, logger=None)
    exchange = RabbitExchange(name, type=ExchangeType.TOPIC, durable=True)
    queue = RabbitQueue(name, queue_type=QueueType.QUORUM, durable=True, routing_key=TOPIC)

    @broker.subscriber(
        queue,
        exchange,
        channel=Channel(prefetch_count=workload.batch),
        ack_policy=AckPolicy.NACK_ON_ERROR,
    )
    async def on_message(body: dict[str, Any]) -> None:
        recorder.handled(body["sent_ns"])

    async def publish() -> None:
        await broker.publish(
            message(), exchange=exchange, routing_key=TOPIC, persist=True, timeout=PUBLISH_TIMEOUT
        )

    await broker.start()
    try:
        metrics = await measure(Publisher(publish), recorder, workload)
        await settle(recorder)
    finally:
        await broker.stop()
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(name)
            await channel.exchange_delete(name)
    return metrics
