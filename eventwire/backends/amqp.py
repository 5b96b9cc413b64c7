"""The ``amqp://`` backend: RabbitMQ over AMQP 0-9-1, with aio-pika.

URL: ``amqp://user:password@host:5672/vhost?namespace=app`` (vhost ``/`` when the path is empty
or ``/``). Optional query parameters: ``prefetch`` (deliveries buffered per consumer, default
64), ``connect_timeout`` (seconds per connection attempt, default 5), ``heartbeat`` (seconds,
default 30), ``history`` (keep a history stream for the tools that read the past: a max age such
as ``7d``, or ``on``; see `eventwire.backends.amqp_history`), ``queues`` (``quorum``, the
default, or ``classic``: the type of durable consumers' queues), ``journal`` and ``handled``
(the stores of durable runs and of handled event ids: see below). Needs RabbitMQ 3.9 or later
(quorum queues and streams).

What a namespace ``ns`` stores on the broker:

- ``ns`` and ``ns.reserved``: durable topic exchanges; an event goes to the second when its
  topic is reserved (first token starts with ``_``), routing key = topic. A pattern whose first
  token starts with ``_`` is bound to ``ns.reserved``, any other to ``ns``, so the broker
  filters exactly: ``*`` and ``>`` never reach the bus's own topics.
- ``ns.<safe name>``: a quorum queue per durable consumer (with ``?queues=classic``, a
  durable classic queue: one node's, far lighter, 10,000 fit on one node), bound with its
  pattern translated
  exactly (``*`` -> ``*``, ``>`` -> ``*.#``: ``#`` alone also matches zero tokens). Ephemeral
  consumers get a classic queue the broker removes 60 s after its last subscriber left.
- ``ns.delay`` (headers exchange) and ``ns.delay.<ms>``: classic queues with that message TTL,
  dead-lettering through the default exchange to the consumer queue named by the routing key:
  `nak` with a delay (RabbitMQ has no delayed delivery of its own). One queue per delay
  (rounded to two significant digits) keeps each FIFO: a long delay never holds back a short.
- ``ns.registry``: a stream (append-only log) of consumer creations and deletions and of delay
  queues, since AMQP 0-9-1 cannot list queues or bindings. Each backend tails it; a ``sync``
  record it writes and reads back tells it has read everything before. It answers
  `consumers`, the pattern check of a reopened consumer (the first creation in the log wins a
  race) and what `destroy` deletes.
- ``ns.history`` (with ``?history=``): a stream bound to both exchanges with ``#``, a copy of
  every event for history reads (`eventwire.backends.amqp_history`).

How the contract maps, and where RabbitMQ falls short (see `AmqpBackend.capabilities`):

- `publish` sends a batch pipelined on one confirm-mode channel (persistent, ``message_id`` =
  event id) and returns when the broker confirmed every message (a quorum queue: stored on a
  majority). Lost connections are retried with backoff until cancelled. RabbitMQ does not
  deduplicate: a publish retried after a lost confirm may be stored twice.
- ``start="latest"`` is the moment the queue is bound. Queues keep no history: ``"earliest"``
  and a datetime raise `BackendCapabilityError` for a new consumer (an existing one resumes).
  Tools' ephemeral readers that start in the past read the history stream instead, where
  there is one.
- A consumer subscribes when opened and buffers up to ``prefetch`` deliveries; `fetch` takes
  from that buffer, oldest first. A caller holding a whole window gets a fresh subscription
  beside the old one (a quorum queue ignores a raised ``basic.qos`` while consuming).
- `attempt` = 1 + the returns RabbitMQ counts (``x-delivery-count`` of quorum queues: on 3.x
  every return, including a prefetched message returned unprocessed, so it can over-count; on
  4.3+ rejections only, so a return after a crash counts as one) + the attempts carried through
  a delayed `nak` in an ``eventwire-attempt`` header. A classic queue counts no returns (only
  ``redelivered``): there every `nak` and every give-back past ack_wait puts a confirmed copy
  carrying the attempt back in the queue, then acknowledges the original.
- ack_wait: RabbitMQ returns unacknowledged deliveries only when their channel closes (a killed
  process, a lost connection) or after its server-wide ``consumer_timeout`` (30 min by
  default), never after a per-consumer time. So a watchdog per consumer gives back
  (``basic.reject``, requeue) what is held past ``ack_wait`` without `extend` (a late `ack` of
  it is ignored), and a consumer that has not fetched for ``ack_wait`` gives its buffer back
  when another subscription competes for the queue. A process whose event loop is blocked
  cannot run the watchdog: its deliveries return when the broker misses its heartbeats.
- `ack` is ``basic.ack`` (one ``multiple`` ack for a contiguous run). It has no reply: if the
  connection drops right after, the message comes again (at least once). RabbitMQ has nowhere
  to keep ``handled_ids``: they go, before the ack, to the store named by ``?handled=<url>``
  (a ``sqlite://``, ``redis://`` or ``nats://`` URL), else to the ``?journal=`` store; with
  neither, ``idempotent=True`` subscriptions are refused with a message saying so.
- A consumer spec'd ``exclusive`` (a partition of a ``partitions=N`` subscription, see
  `eventwire.backends.partitions`) is a single-active-consumer queue: the broker lets one
  process at a time consume it. Letting go of one closes its channel without a cancel, so that
  what it had not acknowledged is returned and the next consumer made active in one step
  (after a cancel the next one would take newer messages first). Who is alive is told by beats
  on a fanout exchange per group (`eventwire.backends.amqp_groups`).
- `nak` with no delay is ``basic.reject`` with requeue, delivered again at once; with a delay, a
  confirmed copy goes to the delay queue, then the original is acknowledged (a crash in between
  delivers it twice, never zero times).
- `consumers` lists every durable consumer of the namespace (from the registry) with the
  messages ready in its queue (the only count AMQP 0-9-1 gives) plus what this process buffers,
  holds or has delayed. Deliveries held by other processes are invisible to it, hence
  ``cross_process_drain=False``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, ClassVar, TypeVar, cast
from urllib.parse import unquote

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aiormq.abc import ConfirmationFrameType
from pamqp.common import FieldTable

from eventwire.backends.amqp_groups import GroupWatch
from eventwire.backends.amqp_history import (
    HistoryOption,
    StreamReader,
    declare_history_stream,
    history_exists,
)
from eventwire.backends.base import (
    EPHEMERAL_KEPT,
    HANDLED_KEPT,
    Backend,
    BackendCapabilityError,
    BackendConnectionError,
    Capabilities,
    Consumer,
    ConsumerInfo,
    ConsumerSpec,
    Delivery,
    Message,
    check_consumer,
    retry_backoff,
    safe_name,
)
from eventwire.backends.broker import BrokerBackend
from eventwire.backends.journal import Journal
from eventwire.backends.partitions import GroupView
from eventwire.backends.url import BusURL, URLOptions
from eventwire.foreign import ForeignMessage
from eventwire.topics import TAIL, validate_pattern, validate_topic

log = logging.getLogger(__name__)
T = TypeVar("T")

# The ``?option=`` settings an amqp:// URL takes (besides ``namespace``).
OPTIONS = (
    "prefetch",
    "connect_timeout",
    "heartbeat",
    "history",
    "queues",
    "journal",
    "handled",
)

# Errors after which an operation is worth retrying on a fresh channel or connection.
_RETRYABLE: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
)
_TOPIC_HEADER = "eventwire-topic"
_ATTEMPT_HEADER = "eventwire-attempt"
# Headers RabbitMQ itself adds to a delivery, which change from one delivery to the next
# (a producer's own may start with "x-" too: those are kept).
_BROKER_HEADERS = frozenset(
    {
        "x-delivery-count",
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-stream-offset",
    }
)
_DELAY_HEADER = "eventwire-delay"
_OWN_HEADERS = frozenset({_TOPIC_HEADER, _ATTEMPT_HEADER, _DELAY_HEADER})
_MAX_DELAY_MS = 24 * 24 * 3600 * 1000  # fits the 32-bit TTL RabbitMQ accepts
# RabbitMQ 4 drops a quorum queue message after 20 returns unless told otherwise; the bus
# decides when to give up (its retry policy and dead letters), so the limit is set out of reach.
_DELIVERY_LIMIT = 1_000_000
_PUBLISH_CHUNK = 1000
_QUORUM_QUEUE: FieldTable = {"x-queue-type": "quorum", "x-delivery-limit": _DELIVERY_LIMIT}
_CLASSIC_QUEUE: FieldTable = {"x-queue-type": "classic", "x-queue-version": 2}
# Consumers' channels a connection holds before the next ones go on another connection:
# RabbitMQ allows 2,047 channels a connection by default (`channel_max`).
_CHANNELS_PER_CONNECTION = 1000
# The restarts stream: records expire with handled ids' time (`HANDLED_KEPT`), in segments of
# 1 MB (RabbitMQ expires whole segments; its default of 500 MB would keep them all).
_RESTARTS_STREAM: FieldTable = {
    "x-queue-type": "stream",
    "x-max-age": f"{int(HANDLED_KEPT // 86_400)}D",
    "x-stream-max-segment-size-bytes": 1_000_000,
}
# For this long after an ack or nak, deliveries RabbitMQ pushed into the room it made may be
# on their way: counted by no queue figure and not arrived (`ConsumerInfo.arriving`).
_IN_TRANSIT = 0.1


def _binding_key(pattern: str) -> str:
    """The AMQP topic binding matching exactly what `pattern` matches."""
    return ".".join("*.#" if token == TAIL else token for token in pattern.split("."))


def _subscribed(underlay: aiormq.abc.AbstractChannel | None, tag: str | None) -> bool:
    """Whether consumer `tag` still consumes on `underlay` (the broker may cancel it)."""
    if underlay is None or underlay.is_closed or tag is None:
        return False
    return not isinstance(underlay, aiormq.Channel) or tag in underlay.consumers


async def _close_quietly(conn: AbstractConnection) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2.0):
            await conn.close()


def _channels(conn: AbstractConnection) -> int:
    """How many channels `conn` has open."""
    return len(conn.transport.connection.channels) if conn.transport is not None else 0


def _alive(conn: AbstractConnection | None) -> bool:
    # aio-pika's `is_closed` only turns True on close(); a lost connection shows underneath.
    if conn is None or conn.is_closed or conn.transport is None:
        return False
    return not conn.transport.connection.is_closed


def _is_reserved(text: str) -> bool:
    return text.startswith("_")


def _delay_ms(delay: float) -> int:
    """`delay` in ms rounded to two significant digits: few delay queues, error under 5%."""
    ms = max(1, round(delay * 1000))
    if ms >= 100:
        scale = 10 ** (int(math.log10(ms)) - 1)
        ms = round(ms / scale) * scale
    return min(ms, _MAX_DELAY_MS)


def _int_header(headers: dict[str, Any], name: str) -> int:
    value = headers.get(name)
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, bytes | str):
        with contextlib.suppress(ValueError):
            return max(0, int(value))
    return 0


def _properties_of(message: Message) -> aiormq.spec.Basic.Properties:
    """A message's AMQP properties: persistent, its id, and what it says to other readers
    (the content type as the property, the trace context as headers)."""
    extra = message.headers or {}
    # Most events carry the content type alone: no table to build then.
    trace = (
        {name: value for name, value in extra.items() if name != "content-type"}
        if len(extra) > 1
        else None
    )
    return aiormq.spec.Basic.Properties(
        message_id=message.id,
        delivery_mode=2,
        content_type=extra.get("content-type"),
        headers=cast("FieldTable", trace) if trace else None,
    )


def _producer_headers(message: AbstractIncomingMessage) -> dict[str, Any]:
    """The headers the producer sent: not eventwire's bookkeeping or the broker's (a
    delivery count, x-death), which change from one delivery to the next."""
    return {
        name: value
        for name, value in (message.headers or {}).items()
        if name not in _BROKER_HEADERS and name not in _OWN_HEADERS
    }


def foreign_message(message: AbstractIncomingMessage, topic: str) -> ForeignMessage:
    """What another producer sent: its headers, with the content type, correlation id and
    type properties beside them, and its ``message_id``."""
    headers = _producer_headers(message)
    for name, value in (
        ("content-type", message.content_type),
        ("content-encoding", message.content_encoding),
        ("correlation_id", message.correlation_id),
        ("type", message.type),
        ("reply_to", message.reply_to),
    ):
        if value and name not in headers:
            headers[name] = value
    return ForeignMessage(topic, bytes(message.body), headers, message.message_id or None)


def message_topic(message: AbstractIncomingMessage) -> str:
    """The topic of a delivered message: its header, else its routing key."""
    topic = (message.headers or {}).get(_TOPIC_HEADER)
    if isinstance(topic, bytes):
        topic = topic.decode(errors="replace")
    if isinstance(topic, str):
        return topic
    # A message routed by an exchange carries its topic as routing key; one put straight
    # into the queue (default exchange) carries the queue name instead.
    return (message.routing_key or "") if message.exchange else ""


def message_attempt(message: AbstractIncomingMessage) -> int:
    """Which delivery of its event `message` is: 1 + the returns the queue counted (a classic
    queue only says whether there was one) + the attempts a copy carries."""
    headers: dict[str, Any] = dict(message.headers or {})
    returns = max(
        _int_header(headers, "x-delivery-count"),
        _int_header(headers, "x-acquired-count"),
        1 if message.redelivered else 0,
    )
    return _int_header(headers, _ATTEMPT_HEADER) + returns + 1


class AmqpBackend(BrokerBackend):
    """RabbitMQ: topic exchanges, a quorum queue per durable consumer, a registry stream."""

    scheme: ClassVar[str] = "amqp"
    messaging_system = "rabbitmq"
    default_port = 5672
    capabilities: ClassVar[Capabilities] = Capabilities(
        # Confirmed, persistent, quorum-replicated: survives process and broker restarts.
        durable=True,
        # Queues hold only what arrived since they were bound; no log to replay from.
        replay=False,
        # With partitions=: each partition's queue has a single active consumer.
        key_order_across_processes=True,
        # No key-value store to record handled ids in.
        # In the store named by ?handled= (or ?journal=): RabbitMQ has none of its own.
        idempotent=True,
        # AMQP 0-9-1 counts ready messages only, not those unacknowledged in other processes.
        cross_process_drain=False,
    )

    def __init__(self, url: BusURL) -> None:
        super().__init__(url)
        options = URLOptions(url, OPTIONS)
        self._prefetch = options.integer("prefetch", 64, minimum=1)
        self._connect_timeout = options.duration("connect_timeout", 5.0, above=True)
        self._heartbeat = options.integer("heartbeat", 30, minimum=1)
        # Durable consumers' queue type: quorum (replicated, counts returns) or classic (one
        # node's, light enough for 10,000 on one node; the bus counts attempts itself).
        self.classic = options.choice("queues", "quorum", ("quorum", "classic")) == "classic"
        self._login = unquote(url.username) if url.username else "guest"
        self._password = unquote(url.password) if url.password is not None else "guest"
        path = url.path[1:] if url.path.startswith("/") else url.path
        self._vhost = unquote(path) if path else "/"
        ns = self.namespace
        self.exchange = ns
        self.reserved_exchange = f"{ns}.reserved"
        self.delay_exchange = f"{ns}.delay"
        self.registry_stream = f"{ns}.registry"
        self.restarts_stream = f"{ns}.restarts"
        self.history = HistoryOption(options)
        self.history_stream = f"{ns}.history"
        self.readers: set[StreamReader] = set()
        self._conn: AbstractConnection | None = None
        self._conn_lock = asyncio.Lock()
        # More connections for consumers' channels, once the main one holds
        # _CHANNELS_PER_CONNECTION (see `consumer_channel`).
        self._more_conns: list[AbstractConnection] = []
        self._channel_lock = asyncio.Lock()
        self._publish_ch: AbstractChannel | None = None
        self._publish_lock = asyncio.Lock()
        self._admin_ch: AbstractChannel | None = None
        self._topology_ok = False
        self._closed = False
        self._open: set[_AmqpConsumer] = set()
        # Partitioned consumers' member lists (`sync_group`), by consumer name.
        self._groups: dict[str, GroupWatch] = {}
        self._delay_queues: set[int] = set()
        # consumer name -> (message id, due time) of the deliveries this process delayed
        self._delayed: dict[str, list[tuple[str | None, float]]] = {}
        self._registry = _Registry(self)
        self._restarts = _Restarts(self)
        # RabbitMQ has no key-value store: durable runs keep their journal in another
        # backend's, named by ?journal=<url> (opened, connected and closed with this one).
        self._journal_backend: Backend | None = None
        journal_url = options.text("journal")
        if journal_url is not None:
            from eventwire.backends import open_backend, resolve_url

            journal_backend = open_backend(resolve_url(journal_url))
            if journal_backend.scheme in ("memory", "amqp"):
                raise ValueError(
                    f"?journal={journal_url!r}: a journal for durable runs must be a durable "
                    "store with one: sqlite:///runs.db, redis://... or nats://... "
                    "(URL-encoded if it has a query of its own)"
                )
            self._journal_backend = journal_backend
        # Handled event ids (idempotent=True) go to ?handled=<url>, else to the journal's.
        self._handled_backend: Backend | None = self._journal_backend
        handled_url = options.text("handled")
        if handled_url is not None:
            from eventwire.backends import open_backend, resolve_url

            handled_backend = open_backend(resolve_url(handled_url))
            if not isinstance(handled_backend, BrokerBackend) or handled_backend.scheme == "amqp":
                raise ValueError(
                    f"?handled={handled_url!r}: handled event ids need a store that keeps "
                    "them: sqlite:///handled.db, redis://... or nats://... (URL-encoded if it "
                    "has a query of its own)"
                )
            self._handled_backend = handled_backend

    # -- connection ------------------------------------------------------------------------

    def queue_name(self, name: str) -> str:
        """The queue of consumer `name` (queue names are at most 255 bytes)."""
        return f"{self.namespace}.{safe_name(name, limit=254 - len(self.namespace))}"

    def _describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        for secret in {self._password, self.url.password or ""}:
            if len(secret) >= 3:
                text = text.replace(secret, "***")
        return text

    def journal(self) -> Journal:
        if self._journal_backend is None:
            raise BackendCapabilityError(
                "amqp:// keeps no run journal of its own (RabbitMQ has no key-value store): "
                "name one in the bus URL, e.g. amqp://guest:guest@127.0.0.1:5672/"
                "?journal=sqlite:///runs.db (or a redis:// or nats:// URL, URL-encoded)"
            )
        return self._journal_backend.journal()

    def records_handled(self) -> bool:
        return self._handled_backend is not None

    def where_handled_go(self) -> str:
        return (
            ": RabbitMQ has nowhere to keep them, so name a store in the URL, "
            "?handled=sqlite:///handled.db (or a redis:// or nats:// URL, URL-encoded)"
        )

    def _handled_store(self) -> BrokerBackend:
        store = self._handled_backend
        if not isinstance(store, BrokerBackend):
            raise BackendCapabilityError(
                f"amqp:// cannot keep handled ids{self.where_handled_go()}"
            )
        return store

    async def record_handled(self, consumer: str, event_ids: Sequence[str]) -> None:
        await self._handled_store().record_handled(f"{self.namespace}/{consumer}", event_ids)

    async def seen_handled(self, consumer: str, event_ids: Sequence[str]) -> set[str]:
        return await self._handled_store().seen_handled(f"{self.namespace}/{consumer}", event_ids)

    async def connect(self) -> None:
        self._closed = False
        if self._journal_backend is not None:
            await self._journal_backend.connect()
        if self._handled_backend not in (None, self._journal_backend):
            assert self._handled_backend is not None
            await self._handled_backend.connect()
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self.connection(retry=False)
                # Read the consumer registry now: opening consumers is faster afterwards.
                await self._registry.ensure()
        except _RETRYABLE as exc:
            await self._drop_connection()
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {self._connect_timeout:g} s"
            else:
                reason = self._describe(exc)
            raise BackendConnectionError(
                f"cannot connect to RabbitMQ at {self.url.redacted}: {reason}"
            ) from None

    async def _open_connection(self) -> AbstractConnection:
        conn = await aio_pika.connect(
            host=self.url.host or "localhost",
            port=self.url.port or 5672,
            login=self._login,
            password=self._password,
            virtualhost=self._vhost,
            timeout=self._connect_timeout,
            heartbeat=self._heartbeat,
            client_properties={"connection_name": f"eventwire {self.namespace}"},
        )
        try:
            await self._declare_topology(conn)
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        return conn

    async def _declare_topology(self, conn: AbstractConnection) -> None:
        async with conn.channel(publisher_confirms=False) as ch:
            for name in (self.exchange, self.reserved_exchange):
                await ch.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
            await ch.declare_exchange(
                self.delay_exchange, aio_pika.ExchangeType.HEADERS, durable=True
            )
            await ch.declare_queue(
                self.registry_stream, durable=True, arguments={"x-queue-type": "stream"}
            )
            await ch.declare_queue(self.restarts_stream, durable=True, arguments=_RESTARTS_STREAM)
            if self.history.enabled:
                await declare_history_stream(self, ch)
        self._topology_ok = True

    async def connection(self, *, retry: bool = True) -> AbstractConnection:
        """A live connection, reconnecting (with backoff, until cancelled) when it was lost."""
        conn = self._conn
        if _alive(conn) and self._topology_ok:
            assert conn is not None
            return conn
        async with self._conn_lock:
            backoff = retry_backoff()
            while True:
                self._check_open()
                conn = self._conn
                if conn is not None and _alive(conn):
                    if self._topology_ok:
                        return conn
                    try:
                        await self._declare_topology(conn)
                        return conn
                    except _RETRYABLE as exc:
                        if not retry:
                            raise
                        log.warning("eventwire: declaring on %s: %s", self.url.redacted, exc)
                        await backoff.wait()
                        continue
                await self._drop_connection()
                try:
                    self._conn = await self._open_connection()
                    return self._conn
                except _RETRYABLE as exc:
                    if not retry:
                        raise
                    log.warning(
                        "eventwire: reconnecting to %s: %s", self.url.redacted, self._describe(exc)
                    )
                    await backoff.wait()

    @property
    def connections(self) -> int:
        """How many connections are open: the main one, and those opened for consumers."""
        return sum(1 for conn in [self._conn, *self._more_conns] if _alive(conn))

    async def consumer_channel(self) -> AbstractChannel:
        """A new channel for one consumer: on the main connection while it has room, else on
        another connection (RabbitMQ allows 2,047 channels a connection, and a process may
        run thousands of subscriptions, a channel each)."""
        async with self._channel_lock:  # else thousands starting at once all pick one
            conn = await self.connection()
            if _channels(conn) >= _CHANNELS_PER_CONNECTION:
                self._more_conns = [c for c in self._more_conns if _alive(c)]
                roomy = [c for c in self._more_conns if _channels(c) < _CHANNELS_PER_CONNECTION]
                if roomy:
                    conn = roomy[0]
                else:
                    conn = await self._open_connection()
                    self._more_conns.append(conn)
            return await conn.channel(publisher_confirms=False)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        self._publish_ch = self._admin_ch = None
        if conn is not None:
            await _close_quietly(conn)

    async def close(self) -> None:
        if self._closed:
            return
        for consumer in [*self._open, *self.readers]:
            with contextlib.suppress(Exception):
                await consumer.close()
        await self._registry.stop()
        await self._restarts.stop()
        for watch in self._groups.values():
            await watch.close()
        self._groups.clear()
        self._closed = True
        await self._drop_connection()
        more, self._more_conns = self._more_conns, []
        for conn in more:
            await _close_quietly(conn)
        if self._journal_backend is not None:
            await self._journal_backend.close()
        if self._handled_backend not in (None, self._journal_backend):
            assert self._handled_backend is not None
            await self._handled_backend.close()

    async def _admin_channel(self) -> AbstractChannel:
        ch = self._admin_ch
        if ch is None or ch.is_closed:
            conn = await self.connection()
            ch = self._admin_ch = await conn.channel(publisher_confirms=False)
        return ch

    def _check_open(self) -> None:
        if self._closed:
            raise BackendConnectionError(f"backend for {self.url.redacted} is closed")

    async def admin(self, operation: Callable[[AbstractChannel], Awaitable[T]]) -> T:
        """Run one declare/delete, retrying through lost connections (not through channel
        errors such as a missing queue: those are raised)."""
        backoff = retry_backoff()
        while True:
            self._check_open()
            ch = await self._admin_channel()
            try:
                return await operation(ch)
            except aiormq.exceptions.ChannelClosed:
                raise
            except _RETRYABLE as exc:
                log.warning("eventwire: retrying on %s: %s", self.url.redacted, exc)
                await backoff.wait()

    # -- publishing ------------------------------------------------------------------------

    async def _publish_channel(self) -> AbstractChannel:
        ch = self._publish_ch
        if ch is None or ch.is_closed:
            async with self._publish_lock:
                ch = self._publish_ch
                if ch is None or ch.is_closed:
                    conn = await self.connection()
                    ch = self._publish_ch = await conn.channel(publisher_confirms=True)
        return ch

    async def publish(self, messages: Sequence[Message]) -> None:
        items = []
        for message in messages:
            # Routing keys hold 255 bytes: the shared limit leaves room for the dead letter's.
            validate_topic(message.topic)
            exchange = self.reserved_exchange if _is_reserved(message.topic) else self.exchange
            items.append((exchange, message.topic, message.body, _properties_of(message)))
        for start in range(0, len(items), _PUBLISH_CHUNK):
            await self.publish_raw(items[start : start + _PUBLISH_CHUNK], retry=True)

    async def publish_raw(
        self,
        items: Sequence[tuple[str, str, bytes, aiormq.spec.Basic.Properties]],
        *,
        retry: bool,
    ) -> None:
        """Publish pipelined and wait for every confirm; retry what failed (if `retry`)."""
        pending = list(items)
        backoff = retry_backoff()
        while pending:
            self._check_open()
            try:
                # aiormq's channel (its abstract class does not declare `wait`).
                underlay = cast(
                    aiormq.Channel, await (await self._publish_channel()).get_underlay_channel()
                )
                results: list[ConfirmationFrameType | BaseException | None]
                # wait=False: a publish waits for its confirm only, not also for its frames
                # to be written out (the confirm comes after them anyway), so that a batch
                # passes the channel's lock in one turn of the loop instead of one each.
                if len(pending) == 1:
                    # One publish (the common awaited case): no task and gather around it.
                    exchange, key, body, props = pending[0]
                    try:
                        results = [
                            await underlay.basic_publish(
                                body,
                                exchange=exchange,
                                routing_key=key,
                                properties=props,
                                wait=False,
                            )
                        ]
                    except Exception as exc:  # as gather(return_exceptions=True) would
                        results = [exc]
                else:
                    # Tasks start in creation order and queue on the channel's FIFO lock
                    # before writing, so the broker receives the batch in order.
                    tasks = [
                        asyncio.ensure_future(
                            underlay.basic_publish(
                                body,
                                exchange=exchange,
                                routing_key=key,
                                properties=props,
                                wait=False,
                            )
                        )
                        for exchange, key, body, props in pending
                    ]
                    results = list(await asyncio.gather(*tasks, return_exceptions=True))
            except _RETRYABLE as exc:
                results = [exc] * len(pending)
            failed = []
            error: BaseException | None = None
            for item, result in zip(pending, results, strict=True):
                if isinstance(result, aiormq.spec.Basic.Ack):
                    continue
                if isinstance(result, BaseException):
                    if not isinstance(result, (*_RETRYABLE, asyncio.CancelledError)):
                        raise result
                    if isinstance(result, aiormq.exceptions.ChannelNotFoundEntity):
                        self._topology_ok = False  # an exchange was deleted: declare it again
                    error = result
                else:
                    error = RuntimeError(f"broker refused the message: {result!r}")
                failed.append(item)
            if not failed:
                return
            if not retry:
                raise BackendConnectionError(f"publish to {self.url.redacted} failed: {error}")
            log.warning(
                "eventwire: retrying %d publish(es) to %s: %s",
                len(failed),
                self.url.redacted,
                error,
            )
            pending = failed
            await backoff.wait()

    # -- consumers -------------------------------------------------------------------------

    async def consumer(self, spec: ConsumerSpec) -> Consumer:
        validate_pattern(spec.pattern)
        if not (spec.start in ("latest", "earliest") or isinstance(spec.start, datetime)):
            raise ValueError(f"start must be 'latest', 'earliest' or a datetime: {spec.start!r}")
        if spec.ephemeral and spec.start != "latest":
            return await self._history_reader(spec)
        queue = await self._make_queue(spec)
        consumer = _AmqpConsumer(self, spec, queue)
        # Subscribe at once: competing consumers take turns from the start (and consuming
        # keeps an ephemeral queue from expiring).
        await consumer.start()
        self._open.add(consumer)
        return consumer

    async def create_consumer(self, spec: ConsumerSpec) -> None:
        validate_pattern(spec.pattern)
        await self._make_queue(spec)  # no consuming: nothing is taken, even for a moment

    async def _make_queue(self, spec: ConsumerSpec) -> str:
        """Declare (or check) the queue of the durable consumer `spec.name`; its name."""
        queue = self.queue_name(spec.name)
        declare = partial(self._declare_consumer_queue, spec=spec, queue=queue)
        if spec.ephemeral:
            await self.admin(declare)
        else:
            await self._registry.ensure()
            registered = self._registry.consumer(spec.name)
            if registered is None:
                if spec.start != "latest":
                    raise BackendCapabilityError(
                        f"amqp:// cannot start consumer {spec.name!r} at {spec.start!r}: "
                        "RabbitMQ queues keep no history, only start='latest' is possible"
                    )
                # Both at once (declaring a quorum queue is the slow part): if another
                # process registered the name first with another pattern, the binding made
                # meanwhile only over-delivered to its queue (the bus filters), and is removed.
                record = {
                    "op": "consumer",
                    "name": spec.name,
                    "pattern": spec.pattern,
                    "group": spec.group,
                }
                await asyncio.gather(self._registry.append(record), self.admin(declare))
                registered = self._registry.consumer(spec.name) or (spec.pattern, spec.group)
                if registered[0] != spec.pattern:
                    await self.admin(partial(self._unbind, spec=spec, queue=queue))
            else:
                await self.admin(declare)  # again: its creator may have died before declaring
            check_consumer(spec, self.url, *registered)
        return queue

    async def keeps_history(self) -> bool:
        return await history_exists(self)

    async def _history_reader(self, spec: ConsumerSpec) -> Consumer:
        """A tool's read of the past (`eventwire.history`), from the history stream."""
        if not await history_exists(self):
            raise BackendCapabilityError(
                f"amqp:// keeps no history here: {self.url.redacted} has no history stream; "
                "run the app with ?history=7d (how long to keep events) in its URL"
            )
        reader = StreamReader(self, spec)
        self.readers.add(reader)
        try:
            await reader.start()
        except BaseException:
            await reader.close()
            raise
        return reader

    def _binding(self, pattern: str) -> tuple[str, str]:
        """(exchange, binding key) of a consumer with `pattern`."""
        exchange = self.reserved_exchange if _is_reserved(pattern) else self.exchange
        return exchange, _binding_key(pattern)

    async def _unbind(self, ch: AbstractChannel, *, spec: ConsumerSpec, queue: str) -> None:
        exchange, key = self._binding(spec.pattern)
        await (await ch.get_queue(queue, ensure=False)).unbind(exchange, key)

    async def _declare_consumer_queue(
        self, ch: AbstractChannel, *, spec: ConsumerSpec, queue: str
    ) -> AbstractQueue:
        if spec.ephemeral:
            declared = await ch.declare_queue(
                queue, durable=False, arguments={"x-expires": int(EPHEMERAL_KEPT * 1000)}
            )
        else:
            arguments = _CLASSIC_QUEUE if self.classic else _QUORUM_QUEUE
            if spec.exclusive:
                arguments = {**arguments, "x-single-active-consumer": True}
            try:
                declared = await ch.declare_queue(queue, durable=True, arguments=arguments)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                kind = "classic" if self.classic else "quorum"
                if spec.exclusive:
                    kind += " single-active-consumer (partitions=)"
                raise ValueError(
                    f"the queue {queue!r} of consumer {spec.name!r} exists on "
                    f"{self.url.redacted} with other settings than this URL's {kind} queues "
                    f"({exc}): use the namespace's ?queues= setting, or delete the consumer"
                ) from None
        exchange, key = self._binding(spec.pattern)
        await declared.bind(exchange, routing_key=key)
        return declared

    async def _queue_counts(self, queue: str) -> tuple[int, int]:
        """Messages ready in `queue`, and consumers attached to it (one per process)."""
        try:
            declared = await self.admin(lambda ch: ch.declare_queue(queue, passive=True))
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0, 0
        result = declared.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)

    def _delayed_count(self, name: str) -> int:
        # A delayed copy counts here until it is delivered again here, or a while after it
        # was due (it is then ready in its queue, or with another process). Counting it twice
        # for a moment is safe for drain, missing it is not.
        now = time.monotonic()
        due = [(i, t) for i, t in self._delayed.get(name, []) if t + 5.0 > now]
        if due:
            self._delayed[name] = due
        else:
            self._delayed.pop(name, None)
        return len(due)

    def _undelay(self, name: str, message_id: str | None) -> None:
        entries = self._delayed.get(name, [])
        for index, (delayed_id, _) in enumerate(entries):
            if delayed_id == message_id:
                del entries[index]
                return

    async def consumers(self) -> list[ConsumerInfo]:
        await self._registry.ensure()
        infos = []
        for name, pattern in sorted(self._registry.view()[0].items()):
            # RabbitMQ knows which processes run a queue: each holds a consumer on it while
            # its connection lives (a killed process's goes with its connection).
            outstanding, processes = await self._queue_counts(self.queue_name(name))
            mine = [c for c in self._open if c.spec.name == name]
            outstanding += sum(c.in_flight for c in mine)
            outstanding += self._delayed_count(name)
            arriving = any(c.arriving for c in mine)
            infos.append(
                ConsumerInfo(name, pattern, outstanding, processes=processes, arriving=arriving)
            )
        infos += [
            ConsumerInfo(name=r.spec.name, pattern=r.spec.pattern, outstanding=r.outstanding)
            for r in self.readers
        ]
        return infos

    async def delete_consumer(self, name: str) -> None:
        await self._registry.ensure()
        if name in self._registry.view()[0]:
            await self._registry.append({"op": "delete", "name": name})
        queue = self.queue_name(name)
        await self.admin(lambda ch: ch.queue_delete(queue))
        self._delayed.pop(name, None)
        if isinstance(self._handled_backend, BrokerBackend):
            await self._handled_backend.forget_handled(f"{self.namespace}/{name}")

    async def _ensure_delay_queue(self, ms: int) -> None:
        if ms in self._delay_queues:
            return
        name = f"{self.delay_exchange}.{ms}"

        async def declare(ch: AbstractChannel) -> None:
            queue = await ch.declare_queue(
                name,
                durable=True,
                arguments={"x-message-ttl": ms, "x-dead-letter-exchange": ""},
            )
            await queue.bind(
                self.delay_exchange, arguments={"x-match": "all", _DELAY_HEADER: str(ms)}
            )

        await self.admin(declare)
        await self._registry.ensure()
        if ms not in self._registry.view()[1]:
            await self._registry.append({"op": "delay", "ms": ms})
        self._delay_queues.add(ms)

    async def count_restart(self, name: str, message: str) -> int:
        """Record one more restart of `message` (its id) for consumer `name`; the count."""
        await self._restarts.append({"op": "restart", "name": name, "message": message})
        return self._restarts.count(name, message)

    async def finish_restarts(self, name: str, messages: Sequence[str]) -> None:
        """Forget the restarts of these acknowledged messages of consumer `name`."""
        self._restarts.forget(name, messages)
        await self._restarts.append({"op": "finish", "name": name, "messages": list(messages)})

    async def sync_group(
        self, group: str, process: str, want: Collection[str], ttl: float
    ) -> GroupView:
        # The partitions' queues have a single active consumer: the broker keeps every slot
        # to one process at a time, so each is "held" as soon as it is wanted.
        watch = self._groups.get(group)
        if watch is None:
            watch = self._groups[group] = GroupWatch(self.connection, self.namespace, group)
        return GroupView(await watch.beat(process, ttl), frozenset(want))

    async def leave_group(self, group: str, process: str) -> None:
        watch = self._groups.pop(group, None)
        if watch is not None:
            try:
                await watch.beat(process, 0.0)
            finally:
                await watch.close()

    async def destroy(self) -> None:
        for consumer in [*self._open, *self.readers]:
            with contextlib.suppress(Exception):
                await consumer.close()
        await self._registry.ensure()
        names, delays = self._registry.view()
        await self._registry.stop()
        await self._restarts.stop()
        queues = [self.queue_name(name) for name in names]
        queues += [f"{self.delay_exchange}.{ms}" for ms in delays | self._delay_queues]
        queues += [self.registry_stream, self.restarts_stream, self.history_stream]
        for queue in queues:
            await self.admin(partial(_delete_queue, name=queue))
        for exchange in (self.exchange, self.reserved_exchange, self.delay_exchange):
            await self.admin(partial(_delete_exchange, name=exchange))
        self._registry.reset()
        self._restarts.reset()
        self._delay_queues.clear()
        self._delayed.clear()
        self._topology_ok = False


@dataclass(slots=True)
class _Held:
    """A delivery handed to the caller: its message, channel generation and lease."""

    message: AbstractIncomingMessage
    generation: int
    tag: int
    deadline: float


class _AmqpConsumer(Consumer):
    def __init__(self, backend: AmqpBackend, spec: ConsumerSpec, queue: str) -> None:
        self.backend = backend
        self.spec = spec
        self.queue = queue
        self._channel: AbstractChannel | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._amqp_queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        # Subscriptions cancelled to give back what an idle consumer had buffered: whatever
        # still arrives for them goes straight back too.
        self._given_up_tags: set[str] = set()
        # Bumped whenever the channel is replaced: deliveries of older channels went back to
        # the broker with it, so their acks must not reach the new channel.
        self._generation = 0
        self._buffer: list[tuple[int, AbstractIncomingMessage]] = []  # heap by delivery tag
        self._arrived: set[int] = set()
        self._contiguous = 0  # every delivery tag up to this one has reached the callback
        self._held: dict[int, _Held] = {}
        # Tags taken by an ack or nak whose frame is not sent yet: still owed, so that a
        # `multiple` ack sent meanwhile stops below them (acking one twice closes the channel).
        self._settling: set[int] = set()
        self._last_settled = -math.inf  # when an ack or nak last made room (monotonic)
        self._wakeup = asyncio.Event()
        # Set when a message arrives: the watchdog sleeps while nothing is buffered or held
        # (ten thousand idle consumers waking every second cost a third of a core).
        self._arrival = asyncio.Event()
        self._watchdog: asyncio.Task[None] | None = None
        self._fetching = 0
        self._last_fetch = time.monotonic()
        self._closed = False
        # Ids of messages whose restarts this consumer counted: their ack forgets the count.
        self._restarted: set[str] = set()

    @property
    def in_flight(self) -> int:
        """Deliveries this consumer holds, has buffered or is acknowledging."""
        return len(self._buffer) + len(self._held) + len(self._settling)

    @property
    def arriving(self) -> bool:
        """Whether deliveries may be on their way: an ack or nak just made room in the
        prefetch window, and what RabbitMQ pushed into it is counted by no queue figure."""
        return time.monotonic() - self._last_settled < _IN_TRANSIT

    # -- subscription ----------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe if not subscribed: at first, after a lost channel, a broker cancel or an
        idle period."""
        ch = self._channel
        if ch is not None and not ch.is_closed:
            if _subscribed(await ch.get_underlay_channel(), self._consumer_tag):
                return
            # Unsubscribed while idle, or cancelled by the broker (queue deleted, cluster
            # change): the channel and the deliveries held on it are still valid.
            self._consumer_tag = None
            await self._subscribe(ch)
            return
        self._reset()
        ch = await self.backend.consumer_channel()
        try:
            await ch.set_qos(prefetch_count=self.backend._prefetch)
            generation = self._generation

            def on_close(_: object, reason: object = None) -> None:
                if self._generation == generation:
                    log.debug(
                        "eventwire: channel of consumer %r closed: %s", self.spec.name, reason
                    )
                    self._wakeup.set()

            ch.close_callbacks.add(on_close)
            underlay = await ch.get_underlay_channel()

            def on_cancel(*_: object) -> None:
                log.debug("eventwire: the broker cancelled consumer %r", self.spec.name)
                self._wakeup.set()

            underlay.on_consumer_cancel_callbacks.add(on_cancel)
            self._channel, self._underlay = ch, underlay
            await self._subscribe(ch)
        except BaseException:
            self._channel = None
            with contextlib.suppress(Exception):
                await ch.close()
            raise
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(
                self._watch(), name=f"eventwire amqp ack_wait {self.spec.name}"
            )

    async def _subscribe(self, ch: AbstractChannel) -> None:
        if self.spec.ephemeral:
            queue = await self.backend._declare_consumer_queue(ch, spec=self.spec, queue=self.queue)
        else:
            # Passive: a durable consumer deleted meanwhile must not come back by itself.
            try:
                queue = await ch.declare_queue(self.queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise LookupError(f"durable subscription {self.spec.name!r} was deleted") from None
        generation = self._generation

        async def on_message(message: AbstractIncomingMessage) -> None:
            if generation != self._generation or self._closed:
                return  # its channel is gone, and the message went back with it
            tag = message.delivery_tag or 0
            self._arrived.add(tag)
            while self._contiguous + 1 in self._arrived:
                self._contiguous += 1
                self._arrived.discard(self._contiguous)
            if message.consumer_tag in self._given_up_tags:
                with contextlib.suppress(*_RETRYABLE, aio_pika.exceptions.MessageProcessError):
                    await message.nack(requeue=True)
                return
            heapq.heappush(self._buffer, (tag, message))
            self._wakeup.set()
            self._arrival.set()

        self._amqp_queue = queue
        self._consumer_tag = await queue.consume(on_message)

    async def _unsubscribe(self, *, give_back: bool) -> None:
        """Cancel the subscription (keeping the channel and what is held on it); `give_back`
        also returns what was buffered, and whatever still arrives for it."""
        queue, tag = self._amqp_queue, self._consumer_tag
        if queue is None or tag is None:
            return
        self._consumer_tag = None
        if give_back:
            self._given_up_tags.add(tag)
        await queue.cancel(tag)
        if give_back:
            # Deliveries sent before the cancel may still be on their way through aio-pika.
            asyncio.get_running_loop().call_later(5.0, self._given_up_tags.discard, tag)
            buffered, self._buffer = self._buffer, []
            for _, message in buffered:
                # nack, not reject: this is not a failed attempt (RabbitMQ 4.3+ counts only
                # rejections in x-delivery-count; older versions count every return).
                with contextlib.suppress(*_RETRYABLE, aio_pika.exceptions.MessageProcessError):
                    await message.nack(requeue=True)

    def _saturated(self) -> bool:
        """Whether the caller holds a whole prefetch window of the current subscription."""
        tag = self._consumer_tag
        held = sum(1 for h in self._held.values() if h.message.consumer_tag == tag)
        return held >= self.backend._prefetch

    def _reset(self) -> None:
        self._generation += 1
        self._channel = None
        self._underlay = None
        self._amqp_queue = None
        self._consumer_tag = None
        self._given_up_tags.clear()
        self._buffer.clear()
        self._arrived.clear()
        self._contiguous = 0
        self._held.clear()
        self._settling.clear()

    # -- fetching --------------------------------------------------------------------------

    def _delivery(self, message: AbstractIncomingMessage) -> Delivery:
        if _DELAY_HEADER in (message.headers or {}):
            self.backend._undelay(self.spec.name, message.message_id)
        tag = message.delivery_tag or 0
        held = _Held(message, self._generation, tag, time.monotonic() + self.spec.ack_wait)
        self._held[tag] = held
        return Delivery(
            topic=message_topic(message),
            body=bytes(message.body),
            attempt=message_attempt(message),
            handle=held,
        )

    async def fetch(self, limit: int, wait: float) -> list[Delivery]:
        if self._closed:
            raise RuntimeError(f"consumer {self.spec.name!r} is closed")
        self._fetching += 1
        try:
            return await self._fetch(limit, wait)
        finally:
            self._fetching -= 1
            self._last_fetch = time.monotonic()

    async def _fetch(self, limit: int, wait: float) -> list[Delivery]:
        if limit <= 0:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait)
        backoff = retry_backoff()
        while True:
            if self._closed:
                return []  # closed while waiting
            remaining = deadline - loop.time()
            if not self._listening():
                try:
                    async with asyncio.timeout(max(remaining, 0.5)):
                        await self.start()
                        if not self._buffer and self._saturated() and not self.spec.exclusive:
                            # The caller holds a whole prefetch window: a quorum queue does
                            # not apply a raised basic.qos to a running subscription, so open
                            # a new one beside it (what is held stays valid: tags are per
                            # channel). Not on a single-active-consumer queue, where the
                            # cancel would make another process's consumer active while
                            # this one still holds earlier messages.
                            await self._unsubscribe(give_back=False)
                            await self.start()
                except _RETRYABLE as exc:
                    if loop.time() >= deadline:
                        return []
                    log.warning("eventwire: consumer %r: %s", self.spec.name, exc)
                    await backoff.wait(deadline - loop.time())
                    continue
            if self._buffer:
                out: list[Delivery] = []
                while self._buffer and len(out) < limit:
                    out.append(self._delivery(heapq.heappop(self._buffer)[1]))
                return out
            if remaining <= 0:
                return []
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                if not self._buffer and self._listening():
                    return []  # the usual end of an idle wait: nothing else to look at

    def _listening(self) -> bool:
        """Whether the subscription is up on a live channel, with room in its window: what
        `start` would see, without a round trip (an idle fetch's turn costs next to nothing)."""
        ch, underlay = self._channel, self._underlay
        if ch is None or ch.is_closed or underlay is None:
            return False
        return _subscribed(underlay, self._consumer_tag) and (
            bool(self._buffer) or not self._saturated()
        )

    async def _watch(self) -> None:
        """Enforce ack_wait, which RabbitMQ has no per-delivery setting for: give back what
        is held past it, and what an idle consumer (not fetching) has buffered for as long."""
        interval = min(max(self.spec.ack_wait / 4, 0.05), 1.0)
        while not self._closed:
            if not self._held and not self._buffer:
                self._arrival.clear()
                await self._arrival.wait()
            await asyncio.sleep(interval)
            try:
                await self._expire()
            except _RETRYABLE:
                pass  # the channel is gone: the broker has taken everything back
            except Exception:
                log.exception("eventwire: ack_wait watchdog of %r failed", self.spec.name)

    async def _expire(self) -> None:
        now = time.monotonic()
        expired = [h for h in self._held.values() if h.deadline <= now]
        if expired and self.spec.exclusive:
            # A single-active-consumer queue: giving one message back would put it behind
            # newer ones. The whole queue goes back instead, in order, for the next consumer
            # in line (this one subscribes again at the end of the line).
            log.warning(
                "eventwire: consumer %r held a delivery past ack_wait=%gs: handing the queue "
                "over with everything it held",
                self.spec.name,
                self.spec.ack_wait,
            )
            ch = self._channel
            self._reset()
            if ch is not None and not ch.is_closed:
                with contextlib.suppress(Exception):
                    await ch.close()
            self._wakeup.set()
            return
        idle = not self._fetching and now - self._last_fetch >= self.spec.ack_wait
        if idle and (expired or self._buffer) and await self._competed():
            # First stop receiving, so that what goes back reaches the competing consumers.
            await self._unsubscribe(give_back=True)
        for held in expired:
            if self._held.get(held.tag) is not held:
                continue
            del self._held[held.tag]
            log.info(
                "eventwire: consumer %r held a delivery past ack_wait=%gs, giving it back",
                self.spec.name,
                self.spec.ack_wait,
            )
            # Settling: no `multiple` ack may cover it while a copy goes back.
            generation = self._generation
            self._settling.add(held.tag)
            try:
                await self._return(held.message, message_attempt(held.message))
            finally:
                if generation == self._generation:
                    self._settling.discard(held.tag)

    async def _competed(self) -> bool:
        """Whether another subscription competes for this queue (else giving back what is
        buffered would only bring it back here, counting one more attempt)."""
        ch = self._channel
        if ch is None or ch.is_closed or self.spec.ephemeral or self.spec.exclusive:
            # A single-active-consumer queue's other subscriptions wait their turn: giving
            # back would hand the queue over while this process still holds earlier messages.
            return False
        declared = await ch.declare_queue(self.queue, passive=True)
        subscribed = 1 if self._consumer_tag is not None else 0
        return (declared.declaration_result.consumer_count or 0) > subscribed

    # -- settling --------------------------------------------------------------------------

    def _take(self, deliveries: Sequence[Delivery]) -> list[_Held]:
        """Remove live deliveries of the current channel from the held set; skip the rest
        (given back by the watchdog, or returned by the broker with a lost channel)."""
        taken = []
        for delivery in deliveries:
            held = delivery.handle
            if (
                isinstance(held, _Held)
                and held.generation == self._generation
                and self._held.get(held.tag) is held
            ):
                del self._held[held.tag]
                taken.append(held)
        return taken

    async def handled(self, event_ids: Sequence[str]) -> set[str]:
        return await self.backend.seen_handled(self.spec.name, event_ids)

    async def restarted(self, delivery: Delivery) -> int:
        held = delivery.handle
        if not isinstance(held, _Held):
            raise BackendCapabilityError("this delivery did not come from the amqp backend")
        message = _message_key(held.message)
        self._restarted.add(message)
        return await self.backend.count_restart(self.spec.name, message)

    async def ack(self, deliveries: Sequence[Delivery], *, handled_ids: Sequence[str] = ()) -> None:
        if handled_ids:
            # Kept before the acknowledgement: a crash in between delivers the event again,
            # and it is then found handled.
            await self.backend.record_handled(self.spec.name, handled_ids)
        taken = self._take(deliveries)
        if not taken:
            return
        tags = {held.tag for held in taken}
        # Being settled from now on, before anything is awaited: another call's `multiple`
        # ack must not cover them (acknowledged twice, a tag closes the channel).
        self._settling |= tags
        generation = self._generation
        try:
            if self._restarted:
                finished = [
                    key for held in taken if (key := _message_key(held.message)) in self._restarted
                ]
                if finished:
                    self._restarted.difference_update(finished)
                    await self.backend.finish_restarts(self.spec.name, finished)
            # One `multiple` ack covers the acked tags below every tag still owed (held,
            # buffered, not arrived yet, or being settled by another call); the others are
            # acked one by one.
            first_owed = min(
                [
                    self._contiguous + 1,
                    *self._held,
                    *(tag for tag, _ in self._buffer),
                    *(self._settling - tags),
                ]
            )
            below = sorted((h for h in taken if h.tag < first_owed), key=lambda h: h.tag)
            rest = [h for h in taken if h.tag >= first_owed]
            with contextlib.suppress(*_RETRYABLE, aio_pika.exceptions.MessageProcessError):
                if below:
                    await below[-1].message.ack(multiple=len(below) > 1)
                for held in rest:
                    await held.message.ack()
        finally:
            self._last_settled = time.monotonic()
            if generation == self._generation:  # tags start again on a new channel
                self._settling -= tags

    def foreign(self, delivery: Delivery) -> ForeignMessage:
        held: _Held = delivery.handle
        return foreign_message(held.message, delivery.topic)

    async def nak(self, delivery: Delivery, delay: float = 0.0) -> None:
        taken = self._take([delivery])
        if not taken:
            return
        tag, generation = taken[0].tag, self._generation
        self._settling.add(tag)
        try:
            await self._give_back(delivery, taken[0].message, delay)
        finally:
            self._last_settled = time.monotonic()
            if generation == self._generation:  # tags start again on a new channel
                self._settling.discard(tag)

    async def _give_back(
        self, delivery: Delivery, message: AbstractIncomingMessage, delay: float
    ) -> None:
        if delay > 0:
            try:
                async with asyncio.timeout(max(self.spec.ack_wait, 5.0)):
                    await self._delay(delivery, message, _delay_ms(delay))
            except _RETRYABLE as exc:
                log.warning(
                    "eventwire: consumer %r: delayed nak failed, redelivering now: %s",
                    self.spec.name,
                    exc,
                )
            else:
                with contextlib.suppress(*_RETRYABLE, aio_pika.exceptions.MessageProcessError):
                    await message.ack()
                return
        await self._return(message, delivery.attempt)

    async def _return(self, message: AbstractIncomingMessage, attempt: int) -> None:
        """Give `message`, delivered for the `attempt`-th time, back to the queue. A quorum
        queue counts the return; a classic queue counts none, so the message goes back as a
        confirmed copy that carries its attempt (then the original is acknowledged: a crash
        in between delivers it twice, never zero times)."""
        if self.backend.classic:
            try:
                async with asyncio.timeout(max(self.spec.ack_wait, 5.0)):
                    properties = self._copy_properties(message, attempt, message_topic(message))
                    body = bytes(message.body)
                    await self.backend.publish_raw(
                        [("", self.queue, body, properties)], retry=False
                    )
            except _RETRYABLE as exc:
                log.warning(
                    "eventwire: consumer %r: could not return a copy: %s", self.spec.name, exc
                )
            else:
                with contextlib.suppress(*_RETRYABLE, aio_pika.exceptions.MessageProcessError):
                    await message.ack()
                return
        with contextlib.suppress(*_RETRYABLE, aio_pika.exceptions.MessageProcessError):
            await message.reject(requeue=True)

    @staticmethod
    def _copy_properties(
        message: AbstractIncomingMessage, attempt: int, topic: str, **headers: str
    ) -> aiormq.spec.Basic.Properties:
        """The properties of a copy of `message` that counts `attempt` deliveries so far. It
        keeps the producer's own headers (a trace context, another producer's CloudEvents
        attributes), not the broker's (a delivery count, x-death)."""
        table: FieldTable = {
            **_producer_headers(message),
            _TOPIC_HEADER: topic,
            _ATTEMPT_HEADER: attempt,
            **headers,
        }
        return aiormq.spec.Basic.Properties(
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            message_type=message.type,
            reply_to=message.reply_to,
            delivery_mode=2,
            headers=table,
        )

    async def _delay(self, delivery: Delivery, message: AbstractIncomingMessage, ms: int) -> None:
        """Put a copy of `message` in the delay queue of `ms`, to come back to this queue."""
        await self.backend._ensure_delay_queue(ms)
        properties = self._copy_properties(
            message, delivery.attempt, delivery.topic, **{_DELAY_HEADER: str(ms)}
        )
        # Not retried on another connection: losing this one gives the original back already.
        body = bytes(message.body)
        await self.backend.publish_raw(
            [(self.backend.delay_exchange, self.queue, body, properties)], retry=False
        )
        self.backend._delayed.setdefault(self.spec.name, []).append(
            (message.message_id, time.monotonic() + ms / 1000)
        )

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        deadline = time.monotonic() + self.spec.ack_wait
        for delivery in deliveries:
            held = delivery.handle
            if isinstance(held, _Held) and self._held.get(held.tag) is held:
                held.deadline = deadline

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        self.backend._open.discard(self)
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        ch, queue, tag = self._channel, self._amqp_queue, self._consumer_tag
        self._reset()
        if ch is not None and not ch.is_closed:
            # Closing the channel returns every unacknowledged delivery to the queue. A
            # single-active-consumer queue's next consumer must get them first: a cancel
            # alone would make it active while they are still out here, and it would take
            # newer ones ahead of them; closing the channel returns them and hands over in
            # one step.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    if queue is not None and tag is not None and not self.spec.exclusive:
                        await queue.cancel(tag)
                    await ch.close()
        if self.spec.ephemeral:
            # Best effort: if the broker is out of reach, the queue expires by itself.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self.backend.admin(partial(_delete_queue, name=self.queue))


class _StreamLog:
    """A stream of JSON records that this backend tails from the start and appends to.

    Records are applied in stream order (`_apply`); a ``sync`` record is written to find the
    end of the stream: once a backend reads its own sync record, it has read everything
    written before it. A tail lost and taken up again reads everything again (`_forget`
    first), since the stream may even have been recreated."""

    def __init__(self, backend: AmqpBackend, stream: str) -> None:
        self.backend = backend
        self.stream = stream
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._channel: AbstractChannel | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None
        self._consumer_tag: str | None = None
        self._synced = False
        self._lock = asyncio.Lock()
        self._tail_lock = asyncio.Lock()

    def reset(self) -> None:
        self._forget()
        self._synced = False

    def _forget(self) -> None:
        """Drop what was read: the stream is read again from its start."""

    def _apply(self, offset: int, record: dict[str, Any]) -> None:
        """Take in one record read from the stream (at `offset`)."""

    def _tailing(self) -> bool:
        # Not tailing any more if the broker cancelled the consumer (stream deleted).
        return _subscribed(self._underlay, self._consumer_tag)

    async def ensure(self) -> None:
        """Tail the stream and make sure everything written before this call has been read."""
        if self._tailing() and self._synced:
            return
        async with self._lock:
            if self._tailing() and self._synced:
                return
            await self.append({"op": "sync"})
            self._synced = True

    async def _tail(self) -> None:
        if self._tailing():
            return
        async with self._tail_lock:
            if self._tailing():
                return
            await self._close_channel()
            self._forget()
            conn = await self.backend.connection()
            ch = await conn.channel(publisher_confirms=False)
            try:
                await ch.set_qos(prefetch_count=1000)  # streams need a prefetch to consume
                queue = await ch.get_queue(self.stream, ensure=False)
                tag = await queue.consume(self._on_record, arguments={"x-stream-offset": "first"})
                underlay = await ch.get_underlay_channel()
            except BaseException:
                with contextlib.suppress(Exception):
                    await ch.close()
                raise
            self._channel, self._underlay, self._consumer_tag = ch, underlay, tag

    async def _on_record(self, message: AbstractIncomingMessage) -> None:
        with contextlib.suppress(*_RETRYABLE, aio_pika.exceptions.MessageProcessError):
            await message.ack()  # credit for the stream consumer
        offset = (message.headers or {}).get("x-stream-offset")
        try:
            record = json.loads(message.body)
        except ValueError:
            return
        if not isinstance(record, dict) or not isinstance(offset, int):
            return
        self._apply(offset, record)
        waiter = self._waiters.get(str(record.get("id")))
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def append(self, record: dict[str, Any]) -> None:
        """Write `record` and return once this backend has read it back."""
        record_id = uuid.uuid4().hex
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[record_id] = waiter
        try:
            body = json.dumps({**record, "id": record_id}).encode()
            properties = aiormq.spec.Basic.Properties(delivery_mode=2)
            backoff = retry_backoff()
            published = False
            while True:
                self.backend._check_open()
                try:
                    if not published:
                        # Declares the stream again if it was destroyed: a record sent to a
                        # queue that does not exist is dropped without an error.
                        await self.backend.connection()
                        await self.backend.publish_raw(
                            [("", self.stream, body, properties)], retry=True
                        )
                        published = True
                    await self._tail()
                    async with asyncio.timeout(5.0):
                        await asyncio.shield(waiter)
                    return
                except _RETRYABLE as exc:
                    if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
                        # The stream is gone (another process destroyed the namespace), and
                        # the record with it: declare it again, then write the record again.
                        self.backend._topology_ok = False
                        published = False
                    # The tail was lost or stalled: read the stream again from the start.
                    log.warning("eventwire: re-reading %s: %s", self.stream, exc)
                    await self._close_channel()
                    await backoff.wait()
        finally:
            self._waiters.pop(record_id, None)

    async def _close_channel(self) -> None:
        ch, self._channel = self._channel, None
        self._underlay = self._consumer_tag = None
        self._synced = False
        if ch is not None and not ch.is_closed:
            with contextlib.suppress(Exception):
                await ch.close()

    async def stop(self) -> None:
        await self._close_channel()


class _Registry(_StreamLog):
    """The namespace's consumer list, kept in a stream that every backend tails, since
    AMQP 0-9-1 cannot list queues or bindings.

    Records: ``consumer`` (name, pattern, group; the first one for a name wins until a
    ``delete``), ``delete`` (name), ``delay`` (ms), and ``sync``."""

    def __init__(self, backend: AmqpBackend) -> None:
        super().__init__(backend, backend.registry_stream)
        self._records: dict[int, dict[str, Any]] = {}  # by stream offset: replays are harmless
        # What the records say, kept as they come in offset order (10,000 consumers opening
        # would otherwise each read all the records again); worked out again from all of them
        # after one came out of order.
        self._consumers: dict[str, dict[str, Any]] = {}
        self._delays: set[int] = set()
        self._last = -1
        self._stale = False

    def _forget(self) -> None:
        self._records.clear()
        self._consumers, self._delays = {}, set()
        self._last, self._stale = -1, False

    def view(self) -> tuple[dict[str, str], set[int]]:
        """(consumer name -> pattern, delay queue ms) as of the records read so far."""
        consumers, delays = self._read()
        return {name: record["pattern"] for name, record in consumers.items()}, delays

    def consumer(self, name: str) -> tuple[str, bool | None] | None:
        """The pattern of consumer `name`, and whether it is a group's (None: not recorded),
        as of the records read so far; None if there is no such consumer."""
        record = self._read()[0].get(name)
        if record is None:
            return None
        group = record.get("group")
        return record["pattern"], group if isinstance(group, bool) else None

    def _read(self) -> tuple[dict[str, dict[str, Any]], set[int]]:
        if self._stale:
            self._consumers, self._delays, self._stale = {}, set(), False
            for offset in sorted(self._records):
                self._take(self._records[offset])
        return self._consumers, self._delays

    def _take(self, record: dict[str, Any]) -> None:
        op = record.get("op")
        if op == "consumer":
            self._consumers.setdefault(record["name"], record)
        elif op == "delete":
            self._consumers.pop(record["name"], None)
        elif op == "delay":
            self._delays.add(record["ms"])

    def _apply(self, offset: int, record: dict[str, Any]) -> None:
        op = record.get("op")
        valid = (
            (op in ("consumer", "delete") and isinstance(record.get("name"), str))
            and (op == "delete" or isinstance(record.get("pattern"), str))
        ) or (op == "delay" and isinstance(record.get("ms"), int))
        if not valid:
            return
        known = offset in self._records
        self._records[offset] = record
        if offset > self._last and not known:
            self._last = offset
            self._take(record)
        else:
            self._stale = True


class _Restarts(_StreamLog):
    """Restarts of redelivered messages, per consumer and message id: RabbitMQ has no
    key-value store, so a stream that expires after `HANDLED_KEPT` keeps them.

    Records: ``restart`` (name, message: one more), ``finish`` (name, messages: forgotten,
    they were acknowledged), and ``sync``. Only messages that came back are ever counted,
    so the stream stays small, and a backend reads it only once it counts a restart."""

    def __init__(self, backend: AmqpBackend) -> None:
        super().__init__(backend, backend.restarts_stream)
        self._counts: dict[tuple[str, str], int] = {}

    def _forget(self) -> None:
        self._counts.clear()

    def _apply(self, offset: int, record: dict[str, Any]) -> None:
        op, name = record.get("op"), record.get("name")
        if not isinstance(name, str):
            return
        if op == "restart" and isinstance(record.get("message"), str):
            key = (name, record["message"])
            self._counts[key] = self._counts.get(key, 0) + 1
        elif op == "finish" and isinstance(record.get("messages"), list):
            for message in record["messages"]:
                if isinstance(message, str):
                    self._counts.pop((name, message), None)

    def count(self, name: str, message: str) -> int:
        """The restarts of `message` for consumer `name`, as of the records read so far."""
        return self._counts.get((name, message), 0)

    def forget(self, name: str, messages: Sequence[str]) -> None:
        """Stop counting these (acknowledged) messages here; recorded by `append`."""
        for message in messages:
            self._counts.pop((name, message), None)


def _message_key(message: AbstractIncomingMessage) -> str:
    """What identifies a message in the restarts stream: its id (the event id), else (another
    producer's) a hash of its body."""
    return message.message_id or hashlib.sha256(message.body).hexdigest()


async def _delete_queue(ch: AbstractChannel, *, name: str) -> object:
    return await ch.queue_delete(name)


async def _delete_exchange(ch: AbstractChannel, *, name: str) -> object:
    return await ch.exchange_delete(name)
