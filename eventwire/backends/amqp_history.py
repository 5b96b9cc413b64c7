"""History on RabbitMQ: a stream every event is also routed to, read back by tools.

RabbitMQ queues forget what they delivered, so `eventwire trace`, `replay` and the history
readers (`eventwire.history`) have nothing to read on a plain ``amqp://`` bus. With
``?history=<max age>`` in the URL (``7d``, ``12h``, ``30m``; ``on`` keeps everything), the
backend declares a stream ``<namespace>.history`` bound to both of the namespace's exchanges
with ``#``: the broker copies every published event into it, and a publish is confirmed only
once the stream has stored it too. A stream is an append-only log that consumers read from
any offset or time without removing anything, so readers see the past while the app's
consumers are untouched.

A reader (`StreamReader`) attaches at the first chunk at or after its start time and filters
by pattern here, since a stream has no bindings of its own. To know where "now" is, it writes
a marker into the stream through the default exchange (no application consumer sees it) once
attached, counts as outstanding until it has read its own marker, and stops consuming there:
the read ends exactly at what was stored before it began, not at a quiet moment, however busy
the bus. What it wants is acknowledged only when handed out, so the prefetch bounds what it
holds; after a lost channel (or a broker cancel) it attaches again at the first offset not
handed out yet.

Retention is RabbitMQ's ``x-max-age``: whole segments are removed once all they hold is older,
so a stream keeps at least that much. Set it once per namespace: RabbitMQ refuses to
re-declare a stream with another age (the error says so); delete the stream to change it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from eventwire.backends.base import Consumer, ConsumerSpec, Delivery
from eventwire.errors import EventwireError
from eventwire.topics import pattern_matches

if TYPE_CHECKING:
    from eventwire.backends.url import BusURL, URLOptions

_MARKER_HEADER = "eventwire-history-marker"
_PREFETCH = 1000  # stream consumers need a prefetch; credit is given back on arrival
_AGE = re.compile(r"([1-9][0-9]*)([smhd])")
_RABBIT_UNITS = {"s": "s", "m": "m", "h": "h", "d": "D"}
_ON = ("on", "true", "yes", "1")
_OFF = ("off", "false", "no", "0")


T = TypeVar("T")

# How far RabbitMQ's clock, which stamps stream chunks, may lag the reader's.
BROKER_CLOCK_LAG = timedelta(minutes=2)


class StreamHost(Protocol):
    """What history streams need of the RabbitMQ backend (an `AmqpBackend`)."""

    url: BusURL
    history: HistoryOption
    history_stream: str
    exchange: str
    reserved_exchange: str
    readers: set[StreamReader]

    async def connection(self, *, retry: bool = True) -> AbstractConnection: ...

    async def admin(self, operation: Callable[[AbstractChannel], Awaitable[T]]) -> T: ...

    async def publish_raw(
        self,
        items: Sequence[tuple[str, str, bytes, aiormq.spec.Basic.Properties]],
        *,
        retry: bool,
    ) -> None: ...


class HistoryOption:
    """The ``?history=`` option of an ``amqp://`` URL: off, on (no age limit), or a max age."""

    def __init__(self, options: URLOptions) -> None:
        value = options.text("history")
        self.enabled = False
        self.max_age: str | None = None  # RabbitMQ's x-max-age syntax: 7D, 12h, 30m, 10s
        if value is None or value.lower() in _OFF:
            return
        self.enabled = True
        if value.lower() in _ON:
            return
        match = _AGE.fullmatch(value.lower())
        if match is None:
            raise options.invalid(
                "history",
                "how long to keep events, as a number and a unit (s, m, h, d), e.g. "
                "history=7d; or history=on to keep everything, history=off for none",
            )
        self.max_age = match.group(1) + _RABBIT_UNITS[match.group(2)]

    def arguments(self) -> dict[str, Any]:
        """The stream's declaration arguments."""
        arguments: dict[str, Any] = {"x-queue-type": "stream"}
        if self.max_age is not None:
            arguments["x-max-age"] = self.max_age
        return arguments


async def declare_history_stream(backend: StreamHost, ch: AbstractChannel) -> None:
    """Create the namespace's history stream and route every event into it."""
    option = backend.history
    try:
        stream = await ch.declare_queue(
            backend.history_stream, durable=True, arguments=option.arguments()
        )
    except aiormq.exceptions.ChannelPreconditionFailed as error:
        raise HistoryStreamMismatchError(
            f"the history stream {backend.history_stream!r} on {backend.url.redacted} exists "
            f"with other settings than history={backend.url.query.get('history')!r} asks for "
            f"({error}); use the same history= in every process, or delete the stream to "
            "change its retention"
        ) from None
    for exchange in (backend.exchange, backend.reserved_exchange):
        await stream.bind(exchange, routing_key="#")


async def history_exists(backend: StreamHost) -> bool:
    """Whether the namespace has a history stream (made by any process with ``?history=``)."""

    async def probe(ch: AbstractChannel) -> bool:
        try:
            await ch.declare_queue(backend.history_stream, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True

    return await backend.admin(probe)


class HistoryStreamMismatchError(EventwireError, ValueError):
    """The history stream exists with another retention than the URL asks for."""


class StreamReader(Consumer):
    """A history read: the stream from `spec.start` on, filtered by `spec.pattern`, up to the
    reader's own marker.

    Matching messages stay unacknowledged until `fetch` hands them out, so the prefetch bounds
    what waits here however slowly the caller reads; the rest is acknowledged (credit given
    back) as it arrives. At the marker the reader stops consuming: what comes after it was
    published after the read began. `outstanding` is what is buffered, plus one until the
    marker came by."""

    def __init__(self, backend: StreamHost, spec: ConsumerSpec) -> None:
        self.backend = backend
        self.spec = spec
        self._token = secrets.token_hex(8)
        self._buffer: deque[Delivery] = deque()
        self._arrived = asyncio.Event()
        self._channel: AbstractChannel | None = None
        self._consumer_tag: str | None = None
        self._attached = False
        self._last_offset: int | None = None  # of the last message that arrived
        self._at_end = False
        self._marked = False
        self._closed = False
        self._stopping: asyncio.Task[None] | None = None

    @property
    def outstanding(self) -> int:
        return len(self._buffer) + (0 if self._at_end else 1)

    async def start(self) -> None:
        """Attach to the stream (again, after a lost channel), then mark where now is."""
        # A channel whose consumer the broker cancelled is still open: not left behind.
        await self._close_channel(cancel=False)
        conn = await self.backend.connection()
        ch = await conn.channel(publisher_confirms=False)
        try:
            await ch.set_qos(prefetch_count=_PREFETCH)
            underlay = await ch.get_underlay_channel()
            # The broker cancels a consumer whose stream was deleted or moved: attach again.
            underlay.on_consumer_cancel_callbacks.add(self._detached)
            stream = await ch.get_queue(self.backend.history_stream, ensure=False)
            offset = self._offset()
            self._buffer.clear()  # they belonged to the lost channel: read again from the first
            self._consumer_tag = await stream.consume(
                self._on_message, arguments={"x-stream-offset": offset}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await ch.close()
            raise
        self._channel, self._attached = ch, True
        if not self._marked:
            properties = aiormq.spec.Basic.Properties(
                delivery_mode=2, headers={_MARKER_HEADER: self._token}
            )
            await self.backend.publish_raw(
                [("", self.backend.history_stream, b"", properties)], retry=True
            )
            self._marked = True

    def _detached(self, *_: object) -> None:
        self._attached = False
        self._arrived.set()

    def _offset(self) -> Any:
        """Where to attach: the first message not handed out yet, else the start."""
        if self._buffer and self._buffer[0].handle[1] is not None:
            return self._buffer[0].handle[1]
        if self._last_offset is not None:
            return self._last_offset + 1
        start = self.spec.start
        if isinstance(start, datetime):
            # An AMQP timestamp: the first chunk the broker stamped at or after it. Its clock
            # may lag this one's (an Erlang VM corrects a clock step slowly), so attach
            # earlier: the reader drops events before its own start by their timestamps.
            return start - BROKER_CLOCK_LAG
        return "first" if start == "earliest" else "next"
        return "first" if start == "earliest" else "next"

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._closed or self._at_end:
            return  # never ack on a channel being closed: the broker would drop the connection
        # Everything before the first await: deliveries arrive in order, and stay in order.
        headers = message.headers or {}
        offset = headers.get("x-stream-offset")
        if not isinstance(offset, int):
            offset = None
        else:
            self._last_offset = offset
        marker = headers.get(_MARKER_HEADER)
        if marker is not None:
            if marker in (self._token, self._token.encode()):
                self._at_end = True  # what follows was published after the read began
                self._arrived.set()
                self._stopping = asyncio.get_running_loop().create_task(self._stop_consuming())
                return
        else:
            topic = message.routing_key or ""
            if message.exchange and topic and pattern_matches(self.spec.pattern, topic):
                # Acknowledged when handed out (`ack`): the prefetch bounds what waits here.
                delivery = Delivery(topic, bytes(message.body), 1, handle=(message, offset))
                self._buffer.append(delivery)
                self._arrived.set()
                return
        with contextlib.suppress(Exception):
            await message.ack()  # credit for the stream consumer; the stream keeps it

    async def _stop_consuming(self) -> None:
        ch, tag = self._channel, self._consumer_tag
        if ch is None or ch.is_closed or tag is None:
            return
        with contextlib.suppress(Exception):
            underlay = await ch.get_underlay_channel()
            await underlay.basic_cancel(tag)

    async def fetch(self, limit: int, wait: float) -> list[Delivery]:
        if self._closed:
            raise RuntimeError(f"history reader {self.spec.name!r} is closed")
        if not self._at_end and not self._is_attached():
            await self.start()  # the channel was lost: go on from the first offset not read
        if not self._buffer and not self._at_end and wait > 0:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._arrived.wait()
        out: list[Delivery] = []
        while self._buffer and len(out) < limit:
            out.append(self._buffer.popleft())
        return out

    def _is_attached(self) -> bool:
        return self._attached and self._channel is not None and not self._channel.is_closed

    async def ack(self, deliveries: Sequence[Delivery], *, handled_ids: Any = ()) -> None:
        """Give the stream its credit back for what was read."""
        if self._closed:
            return
        for delivery in deliveries:
            message = delivery.handle[0] if isinstance(delivery.handle, tuple) else None
            if message is not None and message.channel is not None:
                with contextlib.suppress(Exception):
                    await message.ack()

    async def nak(self, delivery: Delivery, delay: float = 0.0) -> None:
        return None

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        return None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.backend.readers.discard(self)
        self._buffer.clear()
        self._arrived.set()
        await self._close_channel(cancel=not self._at_end)

    async def _close_channel(self, *, cancel: bool) -> None:
        """Close the channel, cancelling the consumer first (`cancel`) so that nothing more
        arrives while it closes."""
        ch, self._channel = self._channel, None
        if ch is not None and not ch.is_closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    if cancel and self._consumer_tag is not None:
                        await (await ch.get_underlay_channel()).basic_cancel(self._consumer_tag)
                    await ch.close()


__all__ = [
    "HistoryOption",
    "HistoryStreamMismatchError",
    "StreamReader",
    "declare_history_stream",
    "history_exists",
]
