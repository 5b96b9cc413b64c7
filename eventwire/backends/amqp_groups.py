"""Who runs a partitioned consumer on RabbitMQ (`AmqpBackend.sync_group`).

AMQP 0-9-1 has no key-value store to hold leases in; it does not need one here. Each
partition's queue is a single-active-consumer queue, so the broker itself lets one process at a
time consume it, and hands it to the next in line (what the previous one had not acknowledged
first) when that one cancels or dies. What remains is knowing who is alive, to deal the
partitions out evenly: each process of a group says so every second on a fanout exchange,
``<ns>.group.<safe name>``, which every member hears through a queue of its own (exclusive:
it goes with the member's connection). A member not heard for a lease's length is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from eventwire.backends.base import safe_name

# How long leaving waits for the broker to confirm the group channel closed.
_CLOSE_TIMEOUT = 2.0


class GroupWatch:
    """One process's view of a group's members, from the beats it hears."""

    def __init__(
        self, connection: Callable[[], Awaitable[AbstractConnection]], namespace: str, group: str
    ) -> None:
        # The backend's live connection (reconnecting when it was lost).
        self.connection = connection
        self.exchange_name = f"{namespace}.group.{safe_name(group, limit=200)}"
        self._channel: AbstractChannel | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        # process -> until when it counts as alive (this process's monotonic clock: no
        # reliance on other machines' clocks).
        self._heard: dict[str, float] = {}

    async def _ensure(self) -> aio_pika.abc.AbstractExchange:
        channel = self._channel
        if channel is not None and not channel.is_closed and self._exchange is not None:
            return self._exchange
        self._heard.clear()
        conn = await self.connection()
        channel = self._channel = await conn.channel(publisher_confirms=False)
        exchange = await channel.declare_exchange(
            self.exchange_name, aio_pika.ExchangeType.FANOUT, durable=False, auto_delete=False
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange)
        await queue.consume(self._on_beat, no_ack=True)
        self._exchange = exchange
        return exchange

    async def _on_beat(self, message: AbstractIncomingMessage) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            beat = json.loads(message.body)
            process, ttl = str(beat["process"]), float(beat["ttl"])
            if ttl > 0:
                self._heard[process] = time.monotonic() + ttl
            else:
                self._heard.pop(process, None)

    async def beat(self, process: str, ttl: float) -> tuple[str, ...]:
        """Say `process` is alive for `ttl` seconds more (0: it leaves); the members heard
        alive, `process` included unless it leaves."""
        exchange = await self._ensure()
        body = json.dumps({"process": process, "ttl": ttl}).encode()
        await exchange.publish(aio_pika.Message(body), routing_key="")
        now = time.monotonic()
        alive = {p for p, until in self._heard.items() if until > now}
        if ttl > 0:
            alive.add(process)
        else:
            alive.discard(process)
        return tuple(sorted(alive))

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        self._exchange = None
        if channel is not None and not channel.is_closed:
            # Bounded: aiormq may wait 30 s, twice, for a CloseOk that a busy broker is slow
            # to send, and a leaving member's next publish would wait behind it.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await channel.close()
