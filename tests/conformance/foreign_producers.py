"""Other systems writing on eventwire's broker, each the way it writes: the broker's raw
client, FastStream, and the CloudEvents SDK through a raw client. Used by
tests/conformance/test_foreign.py and test_foreign_tracing.py."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import aio_pika
import nats
from faststream.nats import NatsBroker
from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange
from faststream.redis import RedisBroker
from redis.asyncio import Redis

from eventwire.backends.url import parse_url


class Producer(Protocol):
    async def raw(self, topic: str, body: bytes, headers: Mapping[str, str]) -> None:
        """Write `body` on `topic` with `headers`, as the broker's own client writes."""

    async def faststream(self, topic: str, message: Any, headers: Mapping[str, str]) -> None:
        """Publish `message` on `topic` with FastStream."""


def _plain(url: str) -> str:
    """The broker's address without eventwire's query (namespace, options)."""
    return url.split("?", 1)[0]


def namespace_of(url: str) -> str:
    return parse_url(url).query.get("namespace", "eventwire")


class RedisProducer:
    """Entries on the namespace's stream: fields ``topic`` and ``body`` and one per header.
    FastStream writes its own format, with the topic as a header (streams have no subject)."""

    def __init__(self, url: str, fast: RedisBroker | None = None) -> None:
        self.url, self.stream = url, "{" + namespace_of(url) + "}:events"
        self.fast = fast

    async def raw(self, topic: str, body: bytes, headers: Mapping[str, str]) -> None:
        client = Redis.from_url(_plain(self.url))
        try:
            fields: dict[Any, Any] = {"topic": topic, "body": body, **headers}
            await client.xadd(self.stream, fields)
        finally:
            await client.aclose()

    async def faststream(self, topic: str, message: Any, headers: Mapping[str, str]) -> None:
        assert self.fast is not None
        await self.fast.publish(message, stream=self.stream, headers={"topic": topic, **headers})


class NatsProducer:
    """Messages on subject ``<namespace>.<topic>``, stored by the namespace's stream."""

    def __init__(self, url: str, fast: NatsBroker | None = None) -> None:
        self.url, self.namespace = url, namespace_of(url)
        self.fast = fast

    async def raw(self, topic: str, body: bytes, headers: Mapping[str, str]) -> None:
        nc = await nats.connect(_plain(self.url))
        try:
            js = nc.jetstream()
            await js.publish(f"{self.namespace}.{topic}", body, headers=dict(headers) or None)
        finally:
            await nc.close()

    async def faststream(self, topic: str, message: Any, headers: Mapping[str, str]) -> None:
        assert self.fast is not None
        stream = f"eventwire_{self.namespace}"
        subject = f"{self.namespace}.{topic}"
        await self.fast.publish(message, subject=subject, stream=stream, headers=dict(headers))


class AmqpProducer:
    """Messages on the namespace's topic exchange, the topic as routing key; a
    ``content-type`` header goes in the AMQP property of that name."""

    def __init__(self, url: str, fast: RabbitBroker | None = None) -> None:
        self.url, self.exchange = url, namespace_of(url)
        self.fast = fast

    async def raw(self, topic: str, body: bytes, headers: Mapping[str, str]) -> None:
        connection = await aio_pika.connect(_plain(self.url))
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(self.exchange, ensure=False)
            table: dict[str, Any] = {k: v for k, v in headers.items() if k != "content-type"}
            message = aio_pika.Message(
                body, headers=table or None, content_type=headers.get("content-type")
            )
            await exchange.publish(message, routing_key=topic)
        finally:
            await connection.close()

    async def faststream(self, topic: str, message: Any, headers: Mapping[str, str]) -> None:
        assert self.fast is not None
        exchange = RabbitExchange(self.exchange, type=ExchangeType.TOPIC, declare=False)
        await self.fast.publish(
            message, exchange=exchange, routing_key=topic, headers=dict(headers)
        )


@contextlib.asynccontextmanager
async def producer(broker: str, url: str, **fast_options: Any) -> AsyncIterator[Producer]:
    """A producer of `broker` writing where the bus at `url` reads, its FastStream broker
    connected (with `fast_options`, e.g. ``middlewares=``) for as long as it is used."""
    plain = _plain(url)
    fast: Any
    made: Any
    if broker == "redis":
        fast = RedisBroker(plain, **fast_options)
        made = RedisProducer(url, fast)
    elif broker == "nats":
        fast = NatsBroker(plain, **fast_options)
        made = NatsProducer(url, fast)
    else:
        fast = RabbitBroker(plain, **fast_options)
        made = AmqpProducer(url, fast)
    await fast.connect()
    try:
        yield made
    finally:
        await fast.stop()
